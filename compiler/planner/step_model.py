"""A symbolic model of one MoE transformer training step: time and memory per device.

The formulas are written once over the parallel layout (the *layout
symbols* below) and read two ways: with numpy arrays for the symbols, so a
search evaluates whole arrays of layouts at once and a pass prices a layer
without building anything; and with sympy symbols, as expressions to read and
check (``StepModel.expressions``, built when first asked for):

    model = StepModel(MoEModel.load("mixtral-8x7b"), Hardware.load("h100"), devices=64)
    out = model.evaluate({"tp": tp, "ep": ep, "pp": pp, "vpp": vpp, "dp": dp, "mb": mb,
                          "recompute": rc, "chunks": n, "hierarchical": hier})   # arrays in, arrays out
    model.evaluate({..., "groups": g})   # and token groups, where a pass asks (the planner searches g = 1)
    model.evaluate({..., "dualpipe": 1})  # or "fb_overlap": 1; recompute 0 none, 1 full, 2 selective
    out["step_s"], out["memory_bytes"], out["tokens_per_s"], out["mfu"]

What one step costs, on the busiest device (the slowest pipeline stage, the
busiest expert-parallel rank):

- compute: every matmul's FLOPs by roofline, at an efficiency that grows with
  the matmul's rows (``efficiency · m / (m + rows_at_half_efficiency)``);
  the experts' grouped matmuls and causal attention at their own rates where
  the profile has them; elementwise work by memory bandwidth (the norms and
  residuals per token, the dispatch, SwiGLU and combine per expert row);
  backward is twice forward; full recomputation runs forward again, selective
  recomputation the model's ``selective_recompute`` parts (norms, MLA's
  up-projections, SwiGLU) in backward; with the FP8 recipe the linear layers
  run at the FP8 peak and their inputs are cast at memory speed; experts
  are slowed by the routing imbalance (busiest / mean expert load);
- communication by alpha-beta per link class, intra-node or inter-node
  (a group crosses nodes when its ranks are further apart than a node holds):
  tensor parallel all-gather / reduce-scatter (sequence parallel), the expert
  all-to-all (dispatch and combine, forward and backward), flat or
  hierarchical (a token crosses to each destination node once: the expected
  number of distinct remote nodes among its top-k), hidden under the experts
  with ``chunks`` chunks as the overlap pass pipelines them (each chunk pays
  the latency; the device hides ``overlap_efficiency`` of what overlaps), or
  with the micro-batch in ``groups`` token groups (each group's exchanges
  hide under the other groups' whole layer, attention included, all but one
  exchange per layer; every matmul has a group's rows), or with paired
  micro-batches (DualPipe, or forward-backward overlap in 1F1B: each exchange
  under the other micro-batch's layer of the other direction), what it hides
  costing the share of the device its kernels hold (``comm_compute_share``:
  a GPU all-to-all's SMs) in compute; a node limit
  caps the nodes the two-step exchange crosses to; an FP8 dispatch sends a
  byte a value;
  pipeline p2p; the data-parallel gradient reduce-scatter and parameter
  all-gather (distributed optimizer), hidden under one micro-batch's backward
  and forward unless the recipe says not to;
- the optimizer (Adam's reads and writes of each weight it updates) and the
  gradient buffers (zeroed once a step, added into by each micro-batch);
- the pipeline: ``(micro-batches + (pp - 1) / vpp)`` stage times (1F1B,
  interleaved with ``vpp`` virtual stages), or DualPipe's ``(pp/2 - 1)``
  forward chunks of bubble;
- memory: weights (bf16, or fp32 by the recipe), fp32 gradients, Adam's
  moments (fp32, or bf16 by the recipe) and fp32 master weights (mixed precision), sharded over data
  parallel with the distributed optimizer (ZeRO-1; ZeRO-2 shards the gradients
  too); activations per layer (each tensor a backward reads with fused kernels,
  MLA's latents and up-projections included; Korthikanti et al.'s ``34·s·b·h``
  for unfused layers; sequence parallel and flash attention, which keeps no
  score matrix; plus the experts' dispatched rows; selective recomputation
  drops what it recomputes, FP8 keeps linear inputs in a byte), ``pp``
  micro-batches in flight on the first stage (``1 + (pp - 1)/(pp·vpp)`` times
  that when interleaved; DualPipe ``pp + 1`` and two stages' weights), or only
  each layer's input under full recomputation.

Ranks are numbered tensor-parallel fastest, then data parallel, then pipeline
(Megatron's order). The expert group is ``ep`` consecutive ranks, folded over
tensor and data parallel (Megatron-Core's parallel folding with expert tensor
parallel 1, MindSpeed's TP-extend-EP): each device dispatches its own
sequence-parallel share of the tokens.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import sympy as sp

from moe_ascend.kernels.errors import MoEAscendError

DATA = Path(__file__).resolve().parents[1] / "data"
LAYOUT = ("tp", "ep", "pp", "vpp", "dp", "mb", "recompute", "chunks", "hierarchical")
OPTIONAL = {"groups": 1, "dualpipe": 0, "fb_overlap": 0}  # symbols a layout may leave out, and their value then
RECOMPUTABLE = ("norm", "attention_up", "swiglu")  # MoEModel.selective_recompute's choices


class PlannerError(MoEAscendError, ValueError):
    """A model, hardware profile or search request the planner cannot use."""


def _load(cls, kind: str, name_or_path: str):
    """A dataclass from a YAML file: a path, or the name of one shipped in ``compiler/data/KIND/``."""
    import yaml

    path = Path(name_or_path)
    if not path.exists():
        path = DATA / kind / f"{name_or_path}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in (DATA / kind).glob("*.yaml"))
        raise PlannerError(f"no {kind.removesuffix('s')} file {name_or_path!r}: give a YAML path or one of {known}")
    values = yaml.safe_load(path.read_text())
    names = {f.name for f in fields(cls)}
    unknown = set(values) - names
    if unknown:
        raise PlannerError(f"{path}: unknown keys {sorted(unknown)}; {cls.__name__} takes {sorted(names)}")
    for key, value in values.items():  # YAML 1.1 reads 1.0e9 (no exponent sign) as a string
        if key != "name" and isinstance(value, str):
            try:
                values[key] = float(value)
            except ValueError:
                raise PlannerError(f"{path}: {key} must be a number, got {value!r}") from None
    try:
        return cls(**values)
    except TypeError as exc:
        raise PlannerError(f"{path}: {exc}") from None


@dataclass(frozen=True)
class MoEModel:
    """The shape of a decoder-only MoE transformer and of its training batch."""

    name: str
    layers: int
    hidden: int
    heads: int
    head_dim: int
    vocab: int
    experts: int
    top_k: int
    expert_ffn: int
    kv_heads: int | None = None
    attention_params: float | None = None  # per layer, where neither GQA nor the MLA fields below give it
    # multi-head latent attention (DeepSeek-V2/V3): queries, keys and values up-projected from compressed latents
    q_rank: int = 0  # the query's latent (0: queries projected from the hidden state)
    kv_rank: int = 0  # the keys' and values' latent (0: not MLA)
    rope_dim: int = 0  # the rotary part of each query and key head, beside head_dim
    v_head_dim: int = 0  # a value head (0: head_dim)
    shared_experts: int = 0
    dense_layers: int = 0  # the first layers are dense FFNs of dense_ffn
    dense_ffn: int = 0
    sequence: int = 4096
    global_batch: int = 1024  # sequences per step
    imbalance: float = 1.0  # busiest / mean expert load the routing leaves
    node_limit: int = 0  # a token's experts lie on at most this many nodes (DeepSeek-V3's M; 0: no limit)
    # a capacity layer's C = capacity_factor · T·k/E slots an expert, exchanged as static buffers (0: dropless,
    # each pair sent once)
    capacity_factor: float = 0.0
    # the training recipe (Megatron's --bf16, --use-distributed-optimizer, --overlap-grad-reduce)
    dtype_bytes: int = 2  # 2: bf16 weights and activations with fp32 master weights; 4: fp32 throughout
    distributed_optimizer: bool = True  # ZeRO-1: the optimizer states and master weights sharded over data parallel
    shard_gradients: bool = False  # ZeRO-2: the gradients too
    overlap_grad_sync: bool = True  # the data-parallel collectives hidden under backward and forward
    adam_moment_bytes: int = 4  # each of Adam's two moments (DeepSeek-V3 keeps them in bf16: 2)
    # the linear layers' matmuls in FP8 with their inputs (and the experts' SwiGLU inputs) kept in FP8 for
    # backward, the dispatch sent in FP8 (DeepSeek-V3's recipe; the router, attention's core, norms and the output
    # layer stay in 16 bits)
    fp8: bool = False
    # the norms, SwiGLU and attention as fused kernels (Transformer Engine, MindSpeed's fused ops) that keep their
    # inputs and a few statistics for backward; False: unfused layers, which keep each intermediate
    fused_kernels: bool = True
    # what selective recomputation (``recompute=2``) recomputes in backward instead of keeping (Megatron's
    # --recompute-modules): "norm" (the norms' outputs), "attention_up" (MLA's up-projected queries, keys and
    # values), "swiglu" (the experts' and shared experts' SwiGLU outputs)
    selective_recompute: tuple[str, ...] = ("norm", "attention_up", "swiglu")

    @classmethod
    def load(cls, name_or_path: str) -> "MoEModel":
        return _load(cls, "models", name_or_path)

    @property
    def moe_layers(self) -> int:
        return self.layers - self.dense_layers

    def __post_init__(self):
        unknown = set(self.selective_recompute) - set(RECOMPUTABLE)
        if unknown:
            raise PlannerError(f"{self.name}: selective_recompute {sorted(unknown)} unknown; choose among "
                               f"{list(RECOMPUTABLE)}")
        object.__setattr__(self, "selective_recompute", tuple(self.selective_recompute))

    @property
    def qk_head_dim(self) -> int:
        return self.head_dim + self.rope_dim

    @property
    def value_head_dim(self) -> int:
        return self.v_head_dim or self.head_dim

    @property
    def attention_params_per_layer(self) -> float:
        if self.attention_params is not None:
            return float(self.attention_params)
        h, heads = self.hidden, self.heads
        if self.kv_rank:  # MLA: down-projections, up-projections from the latents, the output projection
            query = h * self.q_rank + self.q_rank * heads * self.qk_head_dim if self.q_rank else \
                h * heads * self.qk_head_dim
            keys_values = h * (self.kv_rank + self.rope_dim) + self.kv_rank * heads * (self.head_dim
                                                                                       + self.value_head_dim)
            return float(query + keys_values + heads * self.value_head_dim * h)
        kv = self.kv_heads or heads
        return float(h * self.head_dim * (2 * heads + 2 * kv))

    def attention_activations(self, selective: bool) -> tuple[float, float]:
        """What one token's attention block keeps for backward, in elements: (kept at the activations' width,
        kept as a linear layer's input: FP8 under ``fp8``). Flash attention keeps no score matrix."""
        recomputed = set(self.selective_recompute) if selective else set()
        norm_output = 0 if "norm" in recomputed else 1
        heads, h = self.heads, self.hidden
        if self.kv_rank:
            latents = (self.q_rank + self.kv_rank + self.rope_dim) if self.q_rank else self.kv_rank + self.rope_dim
            latent_norms = norm_output * (self.q_rank + self.kv_rank)
            up = 0 if "attention_up" in recomputed else heads * (2 * self.qk_head_dim + self.value_head_dim)
            return h + latents + up, norm_output * h + latent_norms + heads * self.value_head_dim
        kv = self.kv_heads or heads
        return h + (heads + 2 * kv) * self.head_dim, norm_output * h + heads * self.head_dim

    def swiglu_kept(self, ffn: int, selective: bool) -> int:
        """What one row through a SwiGLU MLP of ``ffn`` keeps of its SwiGLU output (the down projection's input):
        all of it, or nothing where selective recomputation redoes it."""
        return 0 if selective and "swiglu" in self.selective_recompute else ffn

    @property
    def expert_params(self) -> float:
        """The routed experts' parameters, all layers (SwiGLU: gate, up and down)."""
        return 3.0 * self.hidden * self.expert_ffn * self.experts * self.moe_layers

    @property
    def dense_params(self) -> float:
        """Everything else: attention, shared experts, dense FFNs, routers, embeddings and the output layer."""
        per_moe_layer = 3.0 * self.hidden * self.expert_ffn * self.shared_experts + self.hidden * self.experts
        return (self.layers * self.attention_params_per_layer + self.moe_layers * per_moe_layer
                + self.dense_layers * 3.0 * self.hidden * self.dense_ffn + 2.0 * self.vocab * self.hidden)

    @property
    def active_params(self) -> float:
        """Parameters one token's forward touches (its top-k experts only)."""
        return self.dense_params + self.expert_params * self.top_k / self.experts


@dataclass(frozen=True)
class Hardware:
    """One device and its links. Rates in FLOP/s and bytes/s, times in seconds; the inter-node link is the node's
    uplink, shared by the ranks of the node that use it at once."""

    name: str
    matmul_flops: float  # bf16 dense peak
    matmul_efficiency: float  # the best fraction of peak a large matmul reaches
    rows_at_half_efficiency: float  # a matmul with this many rows reaches half of matmul_efficiency
    memory_bandwidth: float
    memory_bytes: float
    ranks_per_node: int
    intra_node_bandwidth: float  # per device, one direction
    inter_node_bandwidth: float  # per node uplink, one direction
    intra_node_latency: float
    inter_node_latency: float
    elementwise_bytes_per_token: float = 60.0  # bytes (bf16) per hidden unit the norms, activations and residuals move
    usable_memory: float = 0.9  # the share of memory_bytes a plan may fill
    expert_matmul_flops: float | None = None  # the experts' grouped matmuls' best rate; None: as the dense ones
    expert_rows_at_half_efficiency: float | None = None
    overlap_efficiency: float = 1.0  # the share of the communication under computation that it hides
    attention_flops: float | None = None  # causal (flash) attention forward + backward; None: as a large matmul
    optimizer_bandwidth: float | None = None  # Adam's reads and writes per second; None: memory_bandwidth
    fp8_matmul_flops: float | None = None  # FP8 dense peak; None: no FP8 matmuls
    fp8_matmul_efficiency: float | None = None  # the best fraction of the FP8 peak a matmul reaches; None: as bf16
    # the share of the device's compute that the communication kernels hold while they run (GPUs: the SMs an
    # all-to-all kernel occupies), taken from the computation they overlap
    comm_compute_share: float = 0.0

    @classmethod
    def load(cls, name_or_path: str) -> "Hardware":
        return _load(cls, "hardware", name_or_path)

    def to_json(self) -> dict:
        return asdict(self)


class _Numeric:
    """The formulas' few functions beyond arithmetic, on numpy arrays (and plain numbers)."""

    max, min, ceiling = staticmethod(np.maximum), staticmethod(np.minimum), staticmethod(np.ceil)

    @staticmethod
    def above(a, b):
        """1 where ``a > b``, else 0."""
        return np.greater(a, b).astype(np.float64)


class _Symbolic:
    """The same functions on sympy expressions."""

    max, min, ceiling = staticmethod(sp.Max), staticmethod(sp.Min), staticmethod(sp.ceiling)

    @staticmethod
    def above(a, b) -> sp.Expr:
        return sp.Heaviside(a - b, 0)


def distinct_nodes_fraction(experts: int, top_k: int, nodes) -> object:
    """Expected distinct nodes among a token's top-k experts, over ``top_k`` (experts spread evenly over ``nodes``):
    what the hierarchical all-to-all sends across nodes, relative to the flat one."""
    miss = 1
    for i in range(top_k):  # P(no choice on a given node): choices without replacement
        miss = miss * (experts - experts / nodes - i) / (experts - i)
    return nodes * (1 - miss) / top_k


class StepModel:
    """Step time and memory per device of ``model`` trained on ``devices`` of ``hardware``, as numpy functions of the
    layout (see the module docstring)."""

    def __init__(self, model: MoEModel, hardware: Hardware, devices: int):
        self.model, self.hardware, self.devices = model, hardware, devices

    def evaluate(self, layout: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        arrays = {name: np.asarray(layout[name] if name in LAYOUT else layout.get(name, OPTIONAL[name]),
                                   dtype=np.float64) for name in (*LAYOUT, *OPTIONAL)}
        shape = np.broadcast_shapes(*(a.shape for a in arrays.values()))
        return {name: np.broadcast_to(np.asarray(value, dtype=np.float64), shape)
                for name, value in self._formulas(arrays, _Numeric).items()}

    @functools.cached_property
    def symbols(self) -> dict[str, sp.Symbol]:
        return {name: sp.Symbol(name, positive=True) for name in (*LAYOUT, *OPTIONAL)}

    @functools.cached_property
    def expressions(self) -> dict[str, sp.Expr]:
        """The formulas over the layout symbols (``symbols``)."""
        return self._formulas(self.symbols, _Symbolic)

    # --- the formulas ----------------------------------------------------------------------------

    def _formulas(self, layout: dict, fn) -> dict:
        """Step time, memory and their parts of the ``layout`` (a value per symbol: arrays or sympy symbols), with
        ``fn``'s max, min, ceiling and step function (``_Numeric`` or ``_Symbolic``)."""
        m, hw = self.model, self.hardware
        tp, ep, pp, vpp, dp, mb, rc, chunks, hier, groups, dual, fb = (layout[name] for name in (*LAYOUT, *OPTIONAL))
        if m.fp8 and not hw.fp8_matmul_flops:
            raise PlannerError(f"{m.name} trains with fp8 but {hw.name} gives no fp8_matmul_flops: add it to the "
                               f"hardware file or set fp8: false")
        full = fn.above(rc, 0.5) - fn.above(rc, 1.5)  # recompute=1: every layer's forward again
        selective = fn.above(rc, 1.5)  # recompute=2: the model's selective_recompute parts
        b = m.dtype_bytes
        master = 4 if b < 4 else 0  # mixed precision keeps an fp32 copy of the weights
        # a value kept for backward in FP8 by the recipe: a linear layer's input, an expert's SwiGLU input
        kept_narrow = 1 if m.fp8 else b
        fp8_speedup = (hw.fp8_matmul_flops * (hw.fp8_matmul_efficiency or hw.matmul_efficiency)
                       / (hw.matmul_flops * hw.matmul_efficiency)) if m.fp8 else 1
        h, s, k, f, E = m.hidden, m.sequence, m.top_k, m.expert_ffn, m.experts
        tokens = mb * s  # per micro-batch, per data-parallel replica
        microbatches = m.global_batch / (dp * mb)

        def matmul(flops, rows, peak=hw.matmul_flops * hw.matmul_efficiency, rows_at_half=hw.rows_at_half_efficiency):
            return flops / (peak * rows / (rows + rows_at_half))

        linear_peak = hw.matmul_flops * hw.matmul_efficiency * fp8_speedup  # the router and output layer: 16 bits

        # every rank of a node runs its own group's collective at once: they share the node's uplink
        inter_per_rank = hw.inter_node_bandwidth / hw.ranks_per_node

        def link(size, stride):
            """(bandwidth, latency) of a group of ``size`` ranks ``stride`` apart: intra-node if one node holds it."""
            inside = 1 - fn.above(size * stride, hw.ranks_per_node)
            return (inside * hw.intra_node_bandwidth + (1 - inside) * inter_per_rank,
                    inside * hw.intra_node_latency + (1 - inside) * hw.inter_node_latency)

        def ring(volume, size, stride):
            """An all-gather or reduce-scatter of ``volume`` bytes (the whole tensor) over ``size`` ranks."""
            bandwidth, latency = link(size, stride)
            return (size - 1) * latency + (size - 1) / size * volume / bandwidth

        # -- one layer, one micro-batch, forward, on one device ---------------------------------------
        attention_rate = hw.attention_flops or hw.matmul_flops * hw.matmul_efficiency
        rows = tokens / groups  # each matmul multiplies one token group's rows
        attention = (matmul(2 * tokens * m.attention_params_per_layer / tp, rows, linear_peak)
                     + tokens * s * m.heads * (m.qk_head_dim + m.value_head_dim) / tp / attention_rate)  # (causal)
        elementwise = m.hidden * hw.elementwise_bytes_per_token * b / 2 * tokens / tp / hw.memory_bandwidth
        # the experts: a group of ep consecutive ranks (tensor parallel extends expert parallel: Megatron-Core's
        # folding with expert tensor parallel 1, MindSpeed's TP-extend-EP); each device sends its own tokens
        rows_per_device = tokens * k / tp  # (token, choice) pairs one device computes, on average
        experts_per_device = E / ep
        # each chunk's experts multiply a chunk's share of their rows, at that size's efficiency
        expert_compute = m.imbalance * matmul(
            6 * h * f * rows_per_device, rows_per_device / experts_per_device / chunks / groups,
            (hw.expert_matmul_flops or hw.matmul_flops) * hw.matmul_efficiency * fp8_speedup,
            hw.expert_rows_at_half_efficiency or hw.rows_at_half_efficiency)
        # each row copied in by the dispatch (h read, h written), SwiGLU's silu(gate)·up (2f read, f written), and
        # read back by the combine (h)
        expert_elementwise = m.imbalance * rows_per_device * (3 * h + 3 * f) * b / hw.memory_bandwidth
        shared = matmul(6 * h * f * m.shared_experts * tokens / tp, rows, linear_peak) if m.shared_experts else 0
        router = matmul(2 * tokens * h * E / tp, rows)
        dense_ffn = matmul(6 * h * m.dense_ffn * tokens / tp, rows, linear_peak) if m.dense_layers else 0
        # sequence parallel's all-gather and reduce-scatter around attention (and a dense MLP: the experts take
        # each rank's own tokens)
        tp_comm = 2 * ring(tokens * h * b, tp, 1)
        if m.fp8:  # each linear input cast to FP8 (read wide, written narrow); backward's two casts: twice this
            _, attention_linear = m.attention_activations(False)
            casts = (b + 1) * tokens / tp * (attention_linear + h + m.imbalance * k * (h + f)
                                             + m.shared_experts * f) / hw.memory_bandwidth
            elementwise = elementwise + casts
        # selective recomputation, in backward: the norms (read h, written h), MLA's up-projections, SwiGLU
        redo = set(m.selective_recompute)
        redone = (("norm" in redo) * 2 * h * 2 * b * tokens / tp / hw.memory_bandwidth
                  + ("swiglu" in redo) * 3 * f * b * (m.imbalance * rows_per_device + m.shared_experts * tokens / tp)
                  / hw.memory_bandwidth)
        if "attention_up" in redo and m.kv_rank:
            up = m.q_rank * m.heads * m.qk_head_dim + m.kv_rank * m.heads * (m.head_dim + m.value_head_dim)
            redone = redone + matmul(2 * tokens * up / tp, rows, linear_peak)

        # the expert all-to-all: ep consecutive ranks; those inside one node, and the nodes the group spans
        ep_per_node = fn.min(ep, hw.ranks_per_node)
        ep_nodes = ep / ep_per_node
        remote_share = (ep - ep_per_node) / ep
        dedup = distinct_nodes_fraction(E, k, ep_nodes)  # (with one node nothing crosses: remote_share is 0)
        if m.node_limit:
            dedup = fn.min(dedup, m.node_limit / k)
        # a row crossing nodes in two steps carries its route there (a slot and a weight per expert of the node)
        route_bytes = 2 * 4 * E / ep_nodes / 2  # (dispatch only: half of it per direction)
        # the two-step exchange's dispatch sends its routes beside the tokens, on both links: three collectives
        # per dispatch and combine on each link where the flat exchange has two
        a2a_latency = (hw.inter_node_latency * (ep_nodes - 1) + hw.intra_node_latency * (ep_per_node - 1)) \
            * (1 + hier / 2)

        # rows crossing nodes over the flat exchange's remote pairs. Dropless: every pair once, or each (token,
        # node) once in two steps. Capacity layers send static buffers: the flat one C slots an expert (cf · the
        # pairs), the two-step one min(T, (E/nodes)·C/chunks) rows a node for each chunk's window of the slots (a
        # token with pairs in several windows crosses once in each): chunks · nodes / k of the pairs, at most cf
        cf = m.capacity_factor
        flat_rows = cf if cf else 1
        two_step_rows = fn.min(chunks * ep_nodes / k, cf) if cf else dedup

        def a2a_transfer(element_bytes):
            """One exchange's seconds on the links, each (token, choice) row ``h`` elements of ``element_bytes``."""
            row = h * element_bytes
            inter_bytes = rows_per_device * remote_share * (hier * two_step_rows * (row + route_bytes)
                                                            + (1 - hier) * flat_rows * row)
            intra_bytes = rows_per_device * row * (ep_per_node - 1) / ep
            return inter_bytes / inter_per_rank + intra_bytes / hw.intra_node_bandwidth

        # one micro-batch's forward beside another's backward: DualPipe's pairs, or MindSpeed's --moe-fb-overlap
        # (Megatron-Core's combined 1F1B) in a 1F1B schedule
        paired = dual + fb - dual * fb
        # FP8 dispatch (a scale per 128 values), 16-bit combine; backward's exchanges carry 16-bit gradients
        forward_transfer = a2a_transfer(((1 + 4 / 128) if m.fp8 else b) / 2 + b / 2)
        backward_transfer = a2a_transfer(b)

        def exposed_a2a(transfer, experts, layer, other):
            """Dispatch and combine of each token group in ``chunks`` chunks (each exchange paying the latency),
            hidden under what the schedule lets them overlap, of which the device hides ``overlap_efficiency``.
            One group: its own ``experts``, all but the first dispatch and the last combine (the chunk pipeline).
            Several: the other groups' whole ``layer``, all but one exchange (the groups take turns).
            Paired micro-batches (DualPipe, or forward-backward overlap in 1F1B): the ``other`` direction's layer of
            the micro-batch it runs beside, every exchange. While hidden, the exchange holds
            ``comm_compute_share`` of the device, which the computation under it loses."""
            per_exchange = a2a_latency + transfer / (chunks * groups)
            link = 2 * chunks * groups * per_exchange
            grouped = fn.above(groups, 1)
            exposed_at_least = (1 - paired) * (2 - grouped) * per_exchange
            under = paired * other + (1 - paired) * (grouped * layer + (1 - grouped) * experts)
            hidden = fn.min(link - exposed_at_least, under)
            return link - (hw.overlap_efficiency - hw.comm_compute_share) * hidden

        moe_compute = attention + elementwise + expert_elementwise + router + shared + expert_compute
        a2a_fwd = exposed_a2a(forward_transfer, expert_compute, moe_compute, 2 * moe_compute)
        a2a_bwd = exposed_a2a(backward_transfer, 2 * expert_compute, 2 * moe_compute, moe_compute)
        moe_fwd = moe_compute + tp_comm + a2a_fwd
        moe_bwd = 2 * moe_compute + selective * redone + tp_comm + a2a_bwd
        dense_fwd = attention + elementwise + dense_ffn + 2 * tp_comm
        dense_bwd = 2 * (attention + elementwise + dense_ffn) + 2 * tp_comm

        # -- the slowest pipeline stage: its share of the layers, all MoE (or the first, with the dense ones) --
        layers_per_stage = fn.ceiling(m.layers / (pp * vpp)) * vpp
        dense_in_first = fn.min(m.dense_layers, layers_per_stage)
        moe_in_stage = fn.min(m.moe_layers, layers_per_stage)
        first_is_slowest = fn.above(
            dense_in_first * (dense_fwd + dense_bwd) + (layers_per_stage - dense_in_first) * (moe_fwd + moe_bwd),
            moe_in_stage * (moe_fwd + moe_bwd))
        moe_in_stage = first_is_slowest * (layers_per_stage - dense_in_first) + (1 - first_is_slowest) * moe_in_stage
        dense_in_stage = first_is_slowest * dense_in_first
        stage_fwd = moe_in_stage * moe_fwd + dense_in_stage * dense_fwd
        stage_bwd = moe_in_stage * moe_bwd + dense_in_stage * dense_bwd
        # the output layer's logits, forward and backward, spread over the stages (frameworks give its stage fewer
        # layers)
        output_layer = matmul(2 * tokens * h * m.vocab / tp, rows) * 3
        pp_bandwidth, pp_latency = link(pp, self.devices / pp)
        # (DualPipe overlaps its sends with the micro-batch beside)
        p2p = (1 - dual) * fn.above(pp, 1) * 2 * vpp * (pp_latency + tokens * h * b / tp / pp_bandwidth)
        per_microbatch = stage_fwd * (1 + full) + stage_bwd + p2p + output_layer / pp
        # the bubble: 1F1B (interleaved: over vpp) idles (pp - 1) micro-batches; DualPipe (pp/2 - 1) forward
        # chunks (DeepSeek-V3's (F&B + B - 3W) with the paired chunks as long as F + B + W, and B = W)
        bubble = (1 - dual) * (pp - 1) / vpp * per_microbatch + dual * fn.max(0, pp / 2 - 1) * stage_fwd
        pipeline = microbatches * per_microbatch + bubble
        # what of a micro-batch's time is communication (a recomputed forward repeats its own)
        a2a_per_microbatch = moe_in_stage * ((1 + full) * a2a_fwd + a2a_bwd)
        tp_per_microbatch = (moe_in_stage + 2 * dense_in_stage) * (2 + full) * tp_comm

        # -- data parallel: reduce-scatter gradients, all-gather parameters (distributed optimizer) ------
        dense_per_device = m.dense_params / (tp * pp)
        expert_per_device = m.expert_params / (ep * pp)
        expert_dp = tp * dp / ep  # the ranks holding the same experts, ep apart
        grad_sync = ring(4 * dense_per_device, dp, tp) + ring(4 * expert_per_device, expert_dp, ep)
        param_sync = ring(b * dense_per_device, dp, tp) + ring(b * expert_per_device, expert_dp, ep)
        if m.overlap_grad_sync:
            dp_exposed = fn.max(0, grad_sync - stage_bwd) + fn.max(0, param_sync - stage_fwd)
        else:
            dp_exposed = grad_sync + param_sync
        # the weights each optimizer updates: its shard (distributed optimizer) or all of them
        updated = (dense_per_device / dp + expert_per_device / expert_dp) if m.distributed_optimizer else \
            dense_per_device + expert_per_device
        # Adam reads the gradient, both moments and the (master) weight, writes them back but the gradient
        optimizer = ((12 + 4 * m.adam_moment_bytes + (b if master else 0)) * updated
                     / (hw.optimizer_bandwidth or hw.memory_bandwidth))
        # the gradient buffers: zeroed once a step, each micro-batch's backward adds its gradients in (fp32)
        gradient_buffers = (4 + 12 * microbatches) * (dense_per_device + expert_per_device) / hw.memory_bandwidth
        step = pipeline + dp_exposed + optimizer + gradient_buffers

        # -- memory ---------------------------------------------------------------------------------------
        # DualPipe keeps two pipeline stages' weights on each device, and one more micro-batch in flight
        params = (dense_per_device + expert_per_device) * (1 + dual)
        gradients = 4 * (updated * (1 + dual) if m.shard_gradients else params)
        states = b * params + gradients + (2 * m.adam_moment_bytes + master) * updated * (1 + dual)

        def layer_activations(partly_recomputed: bool):
            """Bytes one MoE layer keeps for backward per micro-batch, selective recomputation dropping what it
            recomputes and FP8 keeping the linear layers' inputs in one byte. Fused kernels (``fused_kernels``):
            each tensor a backward reads, itemised (attention's, the MLP norm's input and output, the router's
            scores, each dispatched row's input, gate and up and SwiGLU output, the shared experts'), the router's
            weights applied inside the experts' activation (Megatron-Core's weighted SwiGLU), so the combine only
            sums and keeps nothing. Unfused: Korthikanti et al.'s ``34·s·b·h`` (sequence parallel, flash
            attention: 17 values a token and hidden unit) and each row's input, output, gate, up, SwiGLU and
            product (``2h + 4f``), what the measured set's peak memory checks; MLA adds what its latents and
            up-projections keep beyond plain attention."""
            kept, linear = m.attention_activations(partly_recomputed)
            norm_output = 0 if partly_recomputed and "norm" in redo else h  # the MLP's norm, beside attention's
            swiglu = m.swiglu_kept(f, partly_recomputed)
            narrow = b - kept_narrow  # the bytes FP8 saves on each kept linear input
            if m.fused_kernels:
                per_token = ((kept + h) * b + (linear + norm_output) * kept_narrow + 4 * E
                             + m.shared_experts * (2 * f * kept_narrow + swiglu * kept_narrow))
                per_row = (h + swiglu) * kept_narrow + 2 * f * kept_narrow
            else:
                all_kept, all_linear = m.attention_activations(False)
                plain_attention = 2 * h + 5 * m.heads * m.head_dim  # what plain attention of these heads keeps
                mla_extra = all_kept + all_linear - plain_attention if m.kv_rank else 0
                dropped = all_kept + all_linear - kept - linear + h - norm_output
                per_token = ((17 * h + mla_extra - dropped) * b - narrow * (linear + norm_output)
                             + m.shared_experts * ((2 * h + 3 * f + swiglu) * b - narrow * swiglu))
                per_row = (2 * h + 3 * f + swiglu) * b - narrow * (h + swiglu)
            return tokens / tp * per_token + m.imbalance * rows_per_device * per_row

        layer_input = tokens * h * b / tp
        layer_acts = full * layer_input + (1 - full) * (selective * layer_activations(True)
                                                        + (1 - selective) * layer_activations(False))
        in_flight = dual * (pp + 1) + (1 - dual) * (fn.min(microbatches, pp) * (
            1 + fn.above(vpp, 1) * (pp - 1) / (pp * vpp)) + fb / vpp)  # (paired: one more model chunk)
        logits = 4 * tokens * m.vocab / tp
        memory = states + layers_per_stage * layer_acts * in_flight + logits

        model_flops = (6 * m.global_batch * s * m.active_params + 3 * m.global_batch * s * s * m.heads
                       * (m.qk_head_dim + m.value_head_dim) * m.layers)
        return {
            "step_s": step,
            "memory_bytes": memory,
            "tokens_per_s": m.global_batch * s / step,
            "mfu": model_flops / (step * self.devices * hw.matmul_flops),
            # the step's parts, which add up to it: the micro-batches' compute and exposed communication, the
            # pipeline's bubble, the data-parallel sync left exposed, the optimizer and the gradient buffers
            "compute_s": microbatches * (per_microbatch - a2a_per_microbatch - tp_per_microbatch - p2p),
            "a2a_exposed_s": microbatches * a2a_per_microbatch,
            "tp_comm_s": microbatches * tp_per_microbatch,
            "pp_p2p_s": microbatches * p2p,
            "bubble_s": bubble,
            "dp_exposed_s": dp_exposed,
            "optimizer_s": optimizer + gradient_buffers,
        }


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def fits(memory_bytes: np.ndarray, hardware: Hardware) -> np.ndarray:
    return memory_bytes <= hardware.usable_memory * hardware.memory_bytes
