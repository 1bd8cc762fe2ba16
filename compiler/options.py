"""The backend's options: one frozen record, validated once, with errors that say what to change."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any, Callable, Mapping

from moe_ascend.kernels.errors import OptionError

TARGETS = ("auto", "inductor", "eager", "ascend")
ROUTINGS = ("keep", "affinity", "node_limited")
# What each routing takes in options["routing_options"]: key -> (valid values or a check, default).
ROUTING_OPTIONS: dict[str, dict[str, tuple[Any, Any]]] = {
    "keep": {},
    "affinity": {
        "gate": (("learned", "grap"), "learned"),  # δ against the gate's rows, or LocMoE's fixed GrAP blocks
        "phase": (("auto", "token_choice", "expert_choice"), "auto"),  # "auto": switch when the statistic says so
        "bound": (("exact", "exp"), "exact"),  # the form of LocMoE's capacity bound
    },
    "node_limited": {"max_nodes": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, None)},
}
# options["ascend_options"] (target "ascend"): key -> (valid values, default).
ASCEND_OPTIONS: dict[str, tuple[tuple, Any]] = {
    "mode": (("max-autotune", "npugraph_ex"), "max-autotune"),  # GE graph mode, or captured NPU graphs of eager kernels
    "dry_run": ((False, True), False),  # no NPU: build the graphs torchair would get, check them, run them eagerly
    # Atlas A2 / A3 (MC2's limits); auto: the NPU's, A2 in a dry run
    "soc": (("auto", "Ascend910B", "Ascend910_93"), "auto"),
}
# options["overlap"] as a dict: key -> default ("token_groups" has none: it is what makes it a dict).
TOKEN_GROUP_OPTIONS: dict[str, Any] = {"token_groups": None, "changes_numerics": False}
DUMP_DIR_ENV = "MOE_ASCEND_DUMP_DIR"


@dataclass(frozen=True)
class Options:
    """What ``torch.compile(..., backend="moe_ascend", options={...})`` accepts (DESIGN.md, public contract)."""

    target: str = "auto"
    hierarchical_a2a: str | bool = "auto"
    overlap: str | bool | int | Mapping[str, Any] = "auto"
    routing: str = "keep"
    routing_options: Mapping[str, Any] | None = None
    ascend_options: Mapping[str, Any] | None = None
    dump_dir: str | None = None
    passes: tuple[str | Callable, ...] = ()
    disable: tuple[str, ...] = ()
    topology: Mapping[str, int] | None = None
    profile: bool = False

    @classmethod
    def from_user(cls, options: Mapping[str, Any] | None) -> "Options":
        """Validate a user's ``options`` dict; ``dump_dir`` falls back to ``$MOE_ASCEND_DUMP_DIR``."""
        options = dict(options or {})
        valid = list(cls.__dataclass_fields__)
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise OptionError(
                f"unknown moe_ascend option(s) {unknown}; valid options are {valid}"
            )
        if options.get("dump_dir") is None and os.environ.get(DUMP_DIR_ENV):
            options["dump_dir"] = os.environ[DUMP_DIR_ENV]
        options["passes"] = tuple(_as_list(options.get("passes", ()), "passes"))
        options["disable"] = tuple(_as_list(options.get("disable", ()), "disable"))
        opts = cls(**options)
        opts._validate()
        return opts

    def _validate(self) -> None:
        _one_of("target", self.target, TARGETS)
        _one_of("routing", self.routing, ROUTINGS)
        self._validate_routing_options()
        self._validate_ascend_options()
        if self.hierarchical_a2a not in ("auto", True, False):
            raise OptionError(
                f"option 'hierarchical_a2a' is {self.hierarchical_a2a!r}; valid values are 'auto', True, False"
            )
        if isinstance(self.overlap, Mapping):
            self._validate_token_groups()
        elif not (self.overlap in ("auto", False) or _count(self.overlap)):
            raise OptionError(
                f"option 'overlap' is {self.overlap!r}; valid values are 'auto', False, a chunk count >= 2, "
                "or {'token_groups': g} with g >= 2 or 'auto' (and optionally 'changes_numerics': True)"
            )
        if not isinstance(self.profile, bool):
            raise OptionError(f"option 'profile' is {self.profile!r}; valid values are True, False")
        if self.dump_dir is not None and not isinstance(self.dump_dir, (str, os.PathLike)):
            raise OptionError(f"option 'dump_dir' is {self.dump_dir!r}; give a folder path or None")
        for p in self.passes:
            if not (isinstance(p, str) or callable(p)):
                raise OptionError(f"option 'passes' holds {p!r}; give pass names or callables")
        for name in self.disable:
            if not isinstance(name, str):
                raise OptionError(f"option 'disable' holds {name!r}; give pass names (strings)")
        if self.topology is not None:
            keys = set(self.topology)
            if keys != {"ranks_per_node"} or not isinstance(self.topology["ranks_per_node"], int):
                raise OptionError(
                    f"option 'topology' is {self.topology!r}; valid values are None (detect) "
                    "or {'ranks_per_node': G} with G an int"
                )

    def _validate_routing_options(self) -> None:
        given = dict(self.routing_options or {})
        valid = ROUTING_OPTIONS[self.routing]
        unknown = sorted(set(given) - set(valid))
        if unknown:
            raise OptionError(
                f"option 'routing_options' has {unknown}, which routing={self.routing!r} does not take; "
                f"it takes {sorted(valid) or 'nothing'}"
            )
        for key, (check, default) in valid.items():
            if key not in given and default is None:
                raise OptionError(f"routing={self.routing!r} needs options['routing_options'][{key!r}]")
            value = given.get(key, default)
            ok = check(value) if callable(check) else value in check
            if not ok:
                want = f"one of {list(check)}" if not callable(check) else "an int >= 1"
                raise OptionError(f"option 'routing_options'[{key!r}] is {value!r}; give {want}")

    def _validate_ascend_options(self) -> None:
        given = dict(self.ascend_options or {})
        unknown = sorted(set(given) - set(ASCEND_OPTIONS))
        if unknown:
            raise OptionError(f"option 'ascend_options' has {unknown}; it takes {sorted(ASCEND_OPTIONS)}")
        for key, value in given.items():
            valid = ASCEND_OPTIONS[key][0]
            if value not in valid or type(value) is not type(valid[0]):
                raise OptionError(f"option 'ascend_options'[{key!r}] is {value!r}; give one of {list(valid)}")
        if given and self.target not in ("ascend", "auto"):
            raise OptionError(f"option 'ascend_options' applies to target 'ascend' (or 'auto'); "
                              f"target is {self.target!r}")

    def _validate_token_groups(self) -> None:
        given = dict(self.overlap)
        unknown = sorted(set(given) - set(TOKEN_GROUP_OPTIONS))
        if unknown:
            raise OptionError(f"option 'overlap' has {unknown}; a dict takes {list(TOKEN_GROUP_OPTIONS)}")
        if not (_count(given.get("token_groups")) or given.get("token_groups") == "auto"):
            raise OptionError(f"option 'overlap'['token_groups'] is {given.get('token_groups')!r}; give an int >= 2, "
                              "or 'auto' (the cost model's choice of groups, or chunks)")
        if not isinstance(given.get("changes_numerics", False), bool):
            raise OptionError(f"option 'overlap'['changes_numerics'] is {given['changes_numerics']!r}; give True "
                              "to let capacity layers drop per group, or False")

    @property
    def token_groups(self) -> int | str:
        """How many token groups the graph is split into (1: not split), or "auto" (the cost model chooses between
        groups and chunks: ``overlap="auto"``)."""
        if isinstance(self.overlap, Mapping):
            return dict(self.overlap)["token_groups"]
        return "auto" if self.overlap == "auto" else 1

    @property
    def overlap_chunks(self) -> str | bool | int:
        """The chunk count of each capacity exchange: "auto", False or an int (False with a token-group count: a
        group's exchange is not chunked yet)."""
        if isinstance(self.overlap, Mapping):
            return "auto" if self.token_groups == "auto" else False
        return self.overlap

    def overlap_option(self, key: str) -> Any:
        """A key of a token-group ``overlap`` dict, its default where not given."""
        given = dict(self.overlap) if isinstance(self.overlap, Mapping) else {}
        return given.get(key, TOKEN_GROUP_OPTIONS[key])

    def ascend_option(self, key: str) -> Any:
        """An ``ascend_options`` value, its default where not given."""
        return dict(self.ascend_options or {}).get(key, ASCEND_OPTIONS[key][1])

    def routing_option(self, key: str) -> Any:
        """A ``routing_options`` value of the chosen routing, its default where not given."""
        return dict(self.routing_options or {}).get(key, ROUTING_OPTIONS[self.routing][key][1])

    def fingerprint(self) -> str:
        """A stable text of everything that shapes the passes (part of Inductor's cache key)."""
        fields = asdict(self)
        fields["passes"] = [p if isinstance(p, str) else _callable_id(p) for p in self.passes]
        fields["routing_options"] = sorted((self.routing_options or {}).items())
        fields["ascend_options"] = sorted((self.ascend_options or {}).items())
        if isinstance(self.overlap, Mapping):
            fields["overlap"] = sorted(self.overlap.items())
        return repr(sorted(fields.items()))


def _count(value: Any) -> bool:
    """An int of at least two (a chunk or group count), not a bool."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 2


def _one_of(name: str, value: Any, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise OptionError(f"option {name!r} is {value!r}; valid values are {list(valid)}")


def _as_list(value: Any, name: str) -> list:
    if isinstance(value, (str, bytes)) or callable(value):
        return [value]
    try:
        return list(value)
    except TypeError:
        raise OptionError(f"option {name!r} is {value!r}; give a list") from None


def _callable_id(fn: Callable) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"
