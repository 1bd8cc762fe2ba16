"""Which ops of a graph Ascend's graph engine could not take, checked on any machine.

torchair (torch_npu's ``torch.compile`` backend, mode ``max-autotune``) turns each
FX node into GE ops through a converter registered for its op; a node whose op
has none, or whose converter only raises ("... ge_converter is not
implemented!"), fails the whole compile, since GE mode has no per-op fallback.
``data/ascend/ge_converters.tsv`` records torchair's converters (from its
sources: the header says which commit, ``regenerate`` rebuilds it), and
``kernels.ascend.ge_form`` says how each moe_ascend op gets there.

An op is covered when its converter is implemented, torchair decomposes it,
the ascend target decomposes it (``kernels.ascend.ATEN_FORMS``), or, for a
moe_ascend op, when its GE form is covered. ``missing_converters(gm)`` lists the rest with the reason;
``check_dump(dir)`` does it for every post-grad graph of a dump, after every pass.

    # the check of a dump
    moe-ascend doctor --ascend-check DUMP_DIR
    # the table, from torchair's sources
    python -m moe_ascend.compiler.report.ascend_coverage regenerate PATH/TO/torchair
"""

from __future__ import annotations

import argparse
import ast
import functools
import operator
import re
import subprocess
from pathlib import Path

import torch
import torch.fx

from moe_ascend.kernels import ascend
from moe_ascend.kernels.errors import MoEAscendError

TABLE = Path(__file__).resolve().parents[1] / "data" / "ascend" / "ge_converters.tsv"
COVERED = ("implemented", "decomposed")
# torchair's own decompositions, which the table lists as such (torchair._utils.get_npu_default_decompositions).
TORCHAIR_DECOMPOSED = ("_c10d_functional.all_to_all_single.default", "npu_define.allgather.default")
_OP_IN_CODE = re.compile(r"torch\.ops\.(\w+)\.(\w+)\.(\w+)\(")
# Python operators FX graphs hold that torchair converts or evaluates itself (getitem picks an output).
_STRUCTURAL = {operator.getitem}


@functools.lru_cache(maxsize=1)
def converter_table() -> dict[str, str]:
    """``{"aten.mm.default": "implemented" | "stub" | "decomposed", ...}`` from the shipped table."""
    table = {}
    for line in TABLE.read_text().splitlines():
        if line and not line.startswith("#"):
            op, status = line.split("\t")
            table[op] = status
    return table


def table_source() -> str:
    """The table's header: where and when it was read."""
    return "\n".join(line[2:] for line in TABLE.read_text().splitlines() if line.startswith("# "))


def _overload(name: str):
    if name.count(".") != 2:
        return None
    namespace, packet, overload = name.split(".")
    try:
        return getattr(getattr(getattr(torch.ops, namespace), packet), overload)
    except AttributeError:
        return None


def op_key(node: torch.fx.Node) -> str | None:
    """``"aten.mm.default"`` for a node calling an op overload; None for what is not an op (placeholders, getitem)."""
    if node.op != "call_function" or node.target in _STRUCTURAL:
        return None
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return f"{target.namespace}.{target._opname}.{target._overloadname}"
    module = getattr(target, "__module__", None) or "?"
    return f"{'operator' if module == '_operator' else module}.{getattr(target, '__name__', target)}"


def why_not_covered(op: str) -> str | None:
    """Why GE could not take ``op`` (a ``namespace.name.overload`` key), or None when it can."""
    namespace, name, _ = op.split(".") if op.count(".") == 2 else (op, op, "")
    if namespace == "moe_ascend":
        form = ascend.ge_form(name)
        if form == "decomposed":
            return None
        if not form:
            return ascend.HOST_SIDE.get(name, "moe_ascend has no GE form for it")
        return None if converter_table().get(form) in COVERED else f"its GE form {form} has no converter in torchair"
    status = converter_table().get(op)
    if status in COVERED or _overload(op) in ascend.ATEN_FORMS:
        return None
    if status == "stub":
        return "torchair registers a converter for it that is not implemented"
    return "torchair has no converter for it"


def missing_converters(gm: torch.fx.GraphModule) -> dict[str, str]:
    """``{op: why}`` for every op of ``gm`` that GE could not take."""
    return _missing(op_key(n) for n in gm.graph.nodes)


def _missing(ops) -> dict[str, str]:
    out = {}
    for op in sorted({op for op in ops if op is not None}):
        why = why_not_covered(op)
        if why is not None:
            out[op] = why
    return out


def ops_in_code(code: str) -> set[str]:
    """The op overloads a dumped graph's FX code calls."""
    return {".".join(m.groups()) for m in _OP_IN_CODE.finditer(code)}


def check_dump(dump_dir: str | Path) -> list[dict]:
    """For every post-grad graph of a dump, after its input and after every pass: the ops GE could not take.

    Each row: ``{"graph", "role", "step" (input or the pass), "missing": {op: why}}``; a dump made under
    ``target="ascend"`` (the dry run without an NPU) holds the graphs torchair would be given.
    """
    from moe_ascend.compiler.report.summary import load_summary

    folder = Path(dump_dir)
    summary = load_summary(folder)
    root = folder if (folder / "summary.json").exists() else next(folder.glob("rank*/"))
    rows = []
    for graph in summary["graphs"]:
        if graph["stage"] != "post_grad":
            continue
        steps = [("input", graph["input_file"])] + [(p["name"], p["file"]) for p in graph["passes"]]
        for step, file in steps:
            missing = _missing(ops_in_code((root / file).read_text()))
            rows.append({"graph": graph["name"], "role": graph["role"], "step": step, "missing": missing})
    return rows


def format_check(rows: list[dict]) -> str:
    source = table_source().splitlines()[1].split(";")[0]  # "Read from Ascend/torchair <commit> (<date>)"
    lines = [f"GE converter check ({source})"]
    for row in rows:
        state = "all ops have a converter" if not row["missing"] else "missing: " + "; ".join(
            f"{op} ({why})" for op, why in row["missing"].items())
        lines.append(f"  {row['graph']:<24}{row['role']:<10}{row['step']:<24}{state}")
    return "\n".join(lines)


# --- regenerating the table from torchair's sources ----------------------------------------------


def scan_torchair(package: Path) -> dict[str, str]:
    """``{op: "implemented" | "stub"}`` for every converter registered in a torchair package folder.

    Registrations are ``@register_fx_node_ge_converter(OP)`` decorators and ``register_fx_node_ge_converter(OP)(fn)``
    calls; a converter whose body (docstring aside) is one ``raise`` is a stub.
    """
    found: dict[str, str] = {}
    for path in sorted(package.rglob("*.py")):
        source = path.read_text(errors="replace")
        if "register_fx_node_ge_converter(" not in source:
            continue
        tree = ast.parse(source)
        functions = {n.name: n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
        registered: list[tuple[str, ast.AST]] = []
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                registered += [(op, node) for op in map(_registered_op, node.decorator_list) if op]
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Call) and node.args:
                op = _registered_op(node.func)
                if op and isinstance(node.args[0], ast.Name) and node.args[0].id in functions:
                    registered.append((op, functions[node.args[0].id]))
        for op, function in registered:
            status = "stub" if _only_raises(function) else "implemented"
            if found.get(op) != "implemented":  # two registrations: one that works is enough
                found[op] = status
    return found


def _registered_op(call: ast.AST) -> str | None:
    if not (isinstance(call, ast.Call) and call.args
            and ast.unparse(call.func).endswith("register_fx_node_ge_converter")):
        return None
    target = ast.unparse(call.args[0])
    return target.removeprefix("torch.ops.")


def _only_raises(function) -> bool:
    body = function.body
    if (body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
            and isinstance(body[0].value.value, str)):
        body = body[1:]
    return len(body) == 1 and isinstance(body[0], ast.Raise)


def regenerate(torchair_checkout: Path, out: Path = TABLE, commit: str | None = None, date: str | None = None) -> int:
    """Rewrite the table from a torchair checkout (its ``python/torchair`` package); returns the row count."""
    package = torchair_checkout / "python" / "torchair"
    if not package.is_dir():
        raise MoEAscendError(f"{torchair_checkout} has no python/torchair; "
                             "give the root of an Ascend/torchair checkout")
    if commit is None:
        commit = _git(torchair_checkout, "rev-parse", "HEAD") or "unknown commit"
    if date is None:
        date = _git(torchair_checkout, "log", "-1", "--format=%cs") or "unknown date"
    rows = scan_torchair(package) | {op: "decomposed" for op in TORCHAIR_DECOMPOSED}
    header = [
        "GE converter coverage of torchair, the torch.compile backend in torch_npu (mode 'max-autotune').",
        f"Read from Ascend/torchair {commit} ({date}); regenerate from a torchair checkout with",
        "  python -m moe_ascend.compiler.report.ascend_coverage regenerate PATH/TO/torchair [--commit C --date D]",
        "op overload<TAB>implemented | stub (the converter only raises) | decomposed (torchair's default "
        "decompositions)",
    ]
    out.write_text("".join(f"# {line}\n" for line in header)
                   + "".join(f"{op}\t{s}\n" for op, s in sorted(rows.items())))
    converter_table.cache_clear()
    return len(rows)


def _git(folder: Path, *args: str) -> str:
    done = subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moe_ascend.compiler.report.ascend_coverage", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    again = commands.add_parser("regenerate", help="rebuild the converter table from a torchair checkout")
    again.add_argument("torchair", type=Path)
    again.add_argument("--commit")
    again.add_argument("--date")
    args = parser.parse_args(argv)
    print(f"{regenerate(args.torchair, commit=args.commit, date=args.date)} ops -> {TABLE}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
