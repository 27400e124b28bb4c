"""Decode cost of a cache plan, predicted from plain facts: what one decode step of the runtime computes and moves.

Pure arithmetic, no tensors. Per layer, the cost of one step is a list of `Term`s, each in two currencies:
multiply-adds (MACs) and bytes moved through memory. A term is either paid per cached token (× T) or once per
step, and either per sequence (× batch) or once for the batch (weights are read once, however many sequences
use them; RoPE tables are computed once for the batch's shared positions). The terms follow what
`runtime/modeling_commonkv.py` and transformers' `DynamicLayer` actually do at a decode step (q = 1 new token,
T cached tokens including it; H query heads, h KV heads, hd head dim, d_kv = h·hd, d hidden size, r rank,
rd rotary dim, e bytes per element):

- a kept layer (`DynamicLayer`): `torch.cat` appends by copying K and V (4·d_kv·e bytes per token: read and
  write); attention does q kᵀ and p·V (2·H·hd MACs, reads 2·d_kv·e);
- a latent layer: the storing one appends by copying its latent (2·r·e); every latent layer, also a merged
  group's readers, rebuilds *all* T keys each step: `k_up` (r·d_kv MACs, reads r·e, writes d_kv·e), RoPE
  tables cos/sin at T positions (`rope_at`, in fp32, once for the batch) and `apply_rope` (x·cos + rotate_half(x)·sin:
  ≈ 10·d_kv element reads/writes); attention does q kᵀ (H·hd MACs, reads d_kv·e) and, fused, p·C over the latent
  (H·r MACs, reads h·r·e: each KV head streams the expanded latent), then B_v once per step (H·hd·r MACs);
- a `latent_values` layer appends (or, quantized, reads back) its keys as a kept layer does and its value latent
  as a latent layer does; it rebuilds nothing: q kᵀ over its cached keys, then the fused p·C and B_v as above;
- a layer that lends its rebuilt K/V to a KVSharer sharer (`lends`) also rebuilds all values (r·d_kv MACs) and
  attends over them explicitly (H·hd MACs);
- a KVSharer sharer attends over its source's K/V (`BorrowLayer`: attention only) or, for a latent source with
  `latent_path: refit`, reads the source's latent like a merged group's reader;
- a weighted group's layers each concatenate sinks + merged + recent latents into one sequence every step
  (2·r·e per token), then rebuild keys as above;
- a quantized group (`bits` in its entry, `quantization.py`) appends only to its short unquantized window, but
  every step reads back all its codes: unpack and dequantize (b/8 bytes read, 2 MACs and e bytes written per
  element) and concatenate the recent window (e read and written per element), before attending as above.

The rest of the model (q/o projections, MLP, lm_head) is the same for every plan: its weight matmuls cost about
one MAC per parameter per sequence, and its weights are read once per step. It is included so a relative figure
means "how much slower is a whole step", not "how much slower is attention", which alone would overstate it.

One figure needs a machine: a step's cost is `MACs + macs_per_byte · bytes` (time × peak MAC rate, counting
compute and memory traffic as if they did not overlap). `macs_per_byte` is the machine's peak MAC rate over its
memory bandwidth: a few on a 2-core CPU, ~100 on a datacenter GPU, where moving bytes is what costs and the
rebuild's MACs are relatively cheap. Ops not counted (the same in every plan or negligible): softmax over H·T
scores, the new token's own projections and RoPE, masks, and each op's fixed dispatch overhead.
"""

from __future__ import annotations

from dataclasses import dataclass

PARTS = ("append", "dequant", "rebuild", "rope", "attention", "projections", "rest")
TRIG_MACS = 8  # MAC-equivalents of one vectorized cos or sin (a short polynomial): an assumption, not measured
ROPE_TABLE_BYTES = 4  # cos/sin are computed in fp32 whatever the model's dtype
# Balance of the 2-core CPU the figures of docs/speed.md come from (scripts/speed_benchmark.py measured 68.3 GMAC/s
# fp32 GEMM over 28.2 GB/s memory copy), a default for CPU predictions.
CPU_MACS_PER_BYTE = 2.4


@dataclass(frozen=True)
class Shape:
    """The facts of a model the cost depends on; `weight_macs`: MACs of all its matmuls for one token (≈ its
    parameter count, lm_head included, the embedding lookup not; see `weight_macs_from_config`)."""

    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    hidden: int
    weight_macs: int
    rotary_dim: int | None = None  # None: the whole head dim rotates
    qk_norm: bool = False

    @property
    def d_kv(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def rd(self) -> int:
        return self.rotary_dim or self.head_dim


@dataclass(frozen=True)
class Term:
    """One piece of a step's work: `macs` and `bytes`, × T when `per_token`, × batch when `per_sequence`."""

    part: str
    macs: float
    bytes: float
    per_token: bool
    per_sequence: bool = True

    def at(self, tokens: int, batch: int) -> tuple[float, float]:
        scale = (tokens if self.per_token else 1) * (batch if self.per_sequence else 1)
        return self.macs * scale, self.bytes * scale


@dataclass(frozen=True)
class Role:
    """What one decoder layer does at a decode step (derived from the plan by `layer_roles`)."""

    layer: int
    kind: str  # keep | latent | latent_values | borrow
    rank: int = 0
    stores: bool = True  # appends to its own cache entry (a keep layer, a latent anchor, every weighted layer)
    weighted: bool = False  # concatenates sinks + merged + recent every step
    lends: bool = False  # a KVSharer source of a `source`-path sharer: rebuilds values explicitly
    bits: int | None = None  # its group's precision where quantized


def layer_roles(layers: int, groups: list[dict], sharing: dict | None = None) -> list[Role]:
    """Each layer's decode role from the config block's `groups` and optional `sharing` entry, read the way the
    runtime reads them (`CommonKVConfig.layer_roles`), so a cost is never predicted for a plan it would refuse."""
    from .runtime.configuration_commonkv import CommonKVConfig

    block = {"groups": groups, **({"sharing": sharing} if sharing else {})}
    roles = CommonKVConfig(num_hidden_layers=layers, commonkv=block).layer_roles()
    sources = {r.borrow for r in roles if r.borrow >= 0}
    out = []
    for r in roles:
        bits = groups[r.group].get("bits") if r.stores else None
        if r.borrow >= 0:
            out.append(Role(r.layer, "borrow", stores=False))
        elif r.value_latent:
            out.append(Role(r.layer, "latent_values", r.rank, bits=bits))
        elif not r.latent:
            out.append(Role(r.layer, "keep", bits=bits))
        else:
            out.append(Role(r.layer, "latent", r.rank, stores=r.stores, weighted=r.merge == "weighted",
                            lends=r.layer in sources, bits=bits))
    return out


def group_roles(group: dict) -> list[Role]:
    """The decode roles of one group of a plan without KVSharer sharing, read as `layer_roles` reads a whole plan
    (a merged group's first layer stores the latent, the others read it): what the planner prices an option at."""
    layers, mode, bits = group["layers"], group["mode"], group.get("bits")
    if mode in ("keep", "latent_values"):
        return [Role(l, mode, int(group.get("rank", 0)), bits=bits) for l in layers]
    weighted = mode == "merged" and group.get("merge", "anchor") == "weighted"
    return [Role(l, "latent", int(group["rank"]), stores=mode == "per_layer" or weighted or l == layers[0],
                 weighted=weighted, bits=bits if mode == "per_layer" or l == layers[0] else None) for l in layers]


def group_cost(shape: Shape, group: dict, tokens: int, *, element_size: int = 2,
               macs_per_byte: float = CPU_MACS_PER_BYTE) -> float:
    """MAC-equivalents of one group's layers at a decode step of one sequence with `tokens` cached tokens."""
    total = 0.0
    for role in group_roles(group):
        for term in layer_terms(shape, role, element_size):
            macs, moved = term.at(tokens, 1)
            total += macs + macs_per_byte * moved
    return total


def rest_cost(shape: Shape, *, element_size: int = 2, macs_per_byte: float = CPU_MACS_PER_BYTE) -> float:
    """MAC-equivalents of everything but K/V at a decode step of one sequence (the same in every plan)."""
    return sum(m + macs_per_byte * b for m, b in (t.at(0, 1) for t in rest_terms(shape, element_size)))


def config_element_size(config: dict) -> int:
    """Bytes per element of a config.json's dtype (the cache's, unquantized)."""
    dtype = str(config.get("torch_dtype") or config.get("dtype") or "float32").replace("torch.", "")
    return DTYPE_BYTES.get(dtype, 4)


def _stored(elements: int, role: Role, element_size: int) -> list[Term]:
    """How a layer's `elements` cached values per token are appended to and read back at each step."""
    if role.bits is None:
        return [Term("append", 0, 2 * elements * element_size, True)]  # torch.cat copies the whole cache
    return [Term("dequant", 2 * elements, elements * (role.bits / 8 + element_size), True),
            Term("dequant", 0, 2 * elements * element_size, True)]  # the in-place scale and shift


def layer_terms(shape: Shape, role: Role, element_size: int) -> list[Term]:
    """The terms of one layer's decode step (see the module docstring for where each comes from)."""
    e, d, d_kv, hd, heads = element_size, shape.hidden, shape.d_kv, shape.head_dim, shape.heads
    if role.kind == "borrow":  # attends over the K/V its source attended over; computes and stores nothing
        return [Term("attention", 2 * heads * hd, 2 * d_kv * e, True)]
    if role.kind == "keep":
        return [*_stored(2 * d_kv, role, e),
                Term("attention", 2 * heads * hd, 2 * d_kv * e, True),
                Term("projections", 2 * d * d_kv, 0, False),
                Term("projections", 0, 2 * d * d_kv * e, False, per_sequence=False)]
    r, rd = role.rank, shape.rd
    fused = [Term("attention", heads * r, shape.kv_heads * r * e, True),  # p·C over the latent, B_v once per step
             Term("projections", heads * hd * r, 0, False),
             Term("projections", 0, r * d_kv * e, False, per_sequence=False)]
    if role.kind == "latent_values":
        return [*_stored(d_kv, role, e), *_stored(r, role, e),
                Term("attention", heads * hd, d_kv * e, True), *fused,  # q kᵀ over the cached keys
                Term("projections", d * (d_kv + r), 0, False),  # k_proj and the down-projection
                Term("projections", 0, d * (d_kv + r) * e, False, per_sequence=False)]
    terms = [
        Term("rebuild", r * d_kv, (r + d_kv) * e + (6 * d_kv * e if shape.qk_norm else 0), True),
        Term("rope", rd / 2 + 2 * rd * TRIG_MACS, 10.5 * rd * ROPE_TABLE_BYTES, True, per_sequence=False),
        Term("rope", 2 * d_kv, (10 * d_kv + 2 * rd) * e, True),
        Term("attention", heads * hd, d_kv * e, True),  # q kᵀ over the rebuilt keys
        Term("projections", 0, r * d_kv * e, False, per_sequence=False),  # k_up's weight
    ]
    if role.stores or role.weighted:
        terms += _stored(r, role, e)  # cat of the latent (weighted: of the whole sequence)
    if role.stores:
        terms += [Term("projections", d * r, 0, False), Term("projections", 0, d * r * e, False, per_sequence=False)]
    if role.lends:  # explicit values: rebuilt for every token, attended with p·V
        terms += [Term("rebuild", r * d_kv, (r + d_kv) * e, True), Term("attention", heads * hd, d_kv * e, True),
                  Term("projections", 0, r * d_kv * e, False, per_sequence=False)]
    else:
        terms += fused
    return terms


def rest_terms(shape: Shape, element_size: int) -> list[Term]:
    """Everything but K/V: the source's weight MACs less its K/V projections (which each plan replaces)."""
    macs = shape.weight_macs - shape.layers * 2 * shape.hidden * shape.d_kv
    return [Term("rest", macs, 0, False), Term("rest", 0, macs * element_size, False, per_sequence=False)]


@dataclass(frozen=True)
class StepCost:
    """A decode step's MACs and bytes per part (PARTS), for the whole batch."""

    macs: dict[str, float]
    bytes: dict[str, float]

    @property
    def total_macs(self) -> float:
        return sum(self.macs.values())

    @property
    def total_bytes(self) -> float:
        return sum(self.bytes.values())

    def cost(self, macs_per_byte: float) -> float:
        """MAC-equivalents: time × peak MAC rate on a machine with that balance."""
        return self.total_macs + macs_per_byte * self.total_bytes

    def part_costs(self, macs_per_byte: float) -> dict[str, float]:
        return {p: self.macs[p] + macs_per_byte * self.bytes[p] for p in PARTS}


def step_cost(shape: Shape, roles: list[Role], tokens: int, *, batch: int = 1, element_size: int = 4) -> StepCost:
    """The predicted cost of one decode step with `tokens` cached tokens per sequence."""
    macs, moved = dict.fromkeys(PARTS, 0.0), dict.fromkeys(PARTS, 0.0)
    terms = [t for role in roles for t in layer_terms(shape, role, element_size)] + rest_terms(shape, element_size)
    for term in terms:
        m, b = term.at(tokens, batch)
        macs[term.part] += m
        moved[term.part] += b
    return StepCost(macs, moved)


def full_roles(layers: int) -> list[Role]:
    """The uncompressed cache: every layer keeps its keys and values."""
    return [Role(i, "keep") for i in range(layers)]


@dataclass(frozen=True)
class Relative:
    """A plan's predicted decode step against the full cache's, at one context length, batch and machine."""

    tokens: int
    batch: int
    macs_per_byte: float
    cost: float  # step cost relative to the full cache (MAC-equivalents): > 1 is slower
    macs: float  # multiply-adds relative to the full cache
    bytes: float  # bytes moved relative to the full cache
    speed: float  # 1 / cost: predicted decode tokens/s relative to the full cache


def relative_cost(shape: Shape, groups: list[dict], tokens: int, *, sharing: dict | None = None, batch: int = 1,
                  element_size: int = 4, macs_per_byte: float = CPU_MACS_PER_BYTE) -> Relative:
    """The whole plan's decode step relative to the full cache's, at `tokens` cached tokens per sequence.

    `groups`/`sharing` are the checkpoint config block's `commonkv.groups` and `commonkv.sharing`. The rest of the
    model's per-step cost is included in both (see the module docstring), so 1.0 means the same decode speed.
    """
    plan = step_cost(shape, layer_roles(shape.layers, groups, sharing), tokens, batch=batch,
                     element_size=element_size)
    full = step_cost(shape, full_roles(shape.layers), tokens, batch=batch, element_size=element_size)
    cost = plan.cost(macs_per_byte) / full.cost(macs_per_byte)
    return Relative(tokens, batch, macs_per_byte, cost, plan.total_macs / full.total_macs,
                    plan.total_bytes / full.total_bytes, 1 / cost)


def per_token_cost(shape: Shape, groups: list[dict], *, sharing: dict | None = None,
                   element_size: int = 4) -> list[dict]:
    """Per group: MACs and bytes per cached token per decode step (batch 1), the figures a planner weighs."""
    roles = layer_roles(shape.layers, groups, sharing)
    out = []
    for group in groups:
        terms = [t for layer in group["layers"] for t in layer_terms(shape, roles[layer], element_size) if t.per_token]
        out.append({"layers": list(group["layers"]), "mode": group["mode"],
                    "macs_per_token": sum(t.macs for t in terms), "bytes_per_token": sum(t.bytes for t in terms)})
    return out


def weight_macs_from_config(config: dict) -> int:
    """MACs of one token's matmuls from a config.json (plain or converted, whose base fields are kept).

    Attention q/k/v/o, a gated MLP of three d × I matrices (every supported family's; MoE: the routed experts'
    `num_experts_per_tok` × moe width, a shared expert and the router) and the lm_head: ≈ the parameter count
    less the embeddings (a lookup) and norms (negligible)."""
    d, layers = config["hidden_size"], config["num_hidden_layers"]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    hd = config.get("head_dim") or d // heads
    attention = d * hd * (2 * heads + 2 * kv_heads)
    experts = config.get("num_experts_per_tok") or 0
    if experts:
        width = config.get("moe_intermediate_size") or config["intermediate_size"]
        shared = config.get("shared_expert_intermediate_size") or 0
        router = d * (config.get("num_local_experts") or config.get("num_experts") or 0)
        mlp = 3 * d * (experts * width + shared) + router
    else:
        mlp = 3 * d * config["intermediate_size"]
    return layers * (attention + mlp) + config["vocab_size"] * d


def shape_from_config(config: dict) -> Shape:
    """The Shape of a plain or converted config.json (a converted one keeps the base model's fields), with the
    head facts the converter resolves (`architectures.resolve`)."""
    from .architectures import resolve

    base = {**config, "model_type": config["base_model_type"]} if config.get("model_type") == "commonkv" else config
    facts = resolve(base)
    rope = config.get("rope_parameters") or {}
    partial = rope.get("partial_rotary_factor", config.get("partial_rotary_factor"))
    return Shape(facts.num_layers, facts.num_heads, facts.num_kv_heads, facts.head_dim, facts.hidden_size,
                 weight_macs_from_config(config), int(facts.head_dim * partial) if partial else None, facts.qk_norm)


DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}
CONTEXTS = (2048, 8192)  # the context lengths inspect and the card predict at (the speed targets' lengths)


def config_predictions(config: dict, contexts: tuple[int, ...] = CONTEXTS, batches: tuple[int, ...] = (1,),
                       macs_per_byte: float = CPU_MACS_PER_BYTE) -> list[Relative]:
    """The plan of a converted config.json against the full cache, at each context × batch, in the model's dtype."""
    block = config["commonkv"]
    shape = shape_from_config(config)
    return [relative_cost(shape, block["groups"], t, sharing=block.get("sharing"), batch=b,
                          element_size=config_element_size(config), macs_per_byte=macs_per_byte)
            for t in contexts for b in batches]
