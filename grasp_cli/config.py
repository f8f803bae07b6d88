"""Typed run configuration: TOML recipes, dotted overrides, strict validation.

One ``GraspConfig`` holds a section dataclass per concern. Every field has a
default and a help string (``field(metadata={"help": ...})``). Loading checks
every key and type and raises ``ConfigError`` naming the key and the file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from grasp_cli.artifacts.layout import check_safe_name
from grasp_cli.errors import ConfigError

AUTO_STEPS = -1  # reference.steps = -1: the model kind's default, see ``resolve_auto``
DEFAULT_REFERENCE_STEPS = 300  # a freshly initialized model; a checkpoint (kind 'hf') gets 0


def _f(default: Any, help: str) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class RunSection:
    seed: int = _f(0, "Master seed; every other seed is derived from it unless set.")
    device: str = _f(
        "cpu", "Torch device for sketching and training ('cpu', 'cuda', 'cuda:1', 'auto')."
    )
    threads: int = _f(0, "torch.set_num_threads; 0 keeps torch's default.")


@dataclass
class PrepareSection:
    demo: bool = _f(
        False, "Build the offline demo corpus from Python's own docs and stdlib sources."
    )
    inputs: list[str] = _f([], "Files, folders or globs of .txt / .jsonl / .parquet documents.")
    tasks: dict[str, str] = _f({}, "Target tasks: name -> file/folder/glob of documents.")
    holdout_domains: list[str] = _f([], "Domains whose held-out documents become target tasks.")
    holdout_fraction: float = _f(
        0.25, "Fraction of each holdout domain's documents moved to its task."
    )
    demo_domains: list[str] = _f(
        [],
        "Demo only: stdlib packages used as domains (empty = the built-in list); 'docs' is pydoc prose.",
    )
    demo_repeat_fraction: float = _f(
        0.0,
        "Demo only: the seeded fraction of demo documents that appear repeated (exact copies with "
        "their own ids, as in a crawl without deduplication); 0 = none.",
    )
    demo_repeat_copies: int = _f(3, "Demo only: extra copies of each repeated document.")
    max_docs_per_domain: int = _f(0, "Cap on documents per domain (0 = no cap).")
    max_seqs_per_domain: int = _f(0, "Cap on corpus sequences per domain (0 = no cap).")
    max_task_seqs: int = _f(0, "Cap on sequences per task (0 = no cap).")
    seq_len: int = _f(64, "Tokens per training sequence; each stored row has seq_len+1 tokens.")
    tokenizer: str = _f(
        "bytes",
        "'bytes' (UTF-8 bytes are the tokens, pad 256) or a tokenizer.json file / a folder "
        "holding one (tokenizers library, offline); each document becomes its ids + EOS.",
    )
    eos_token: str = _f(
        "",
        "The end-of-document token of prepare.tokenizer (empty = the first of <|endoftext|>, "
        "</s>, <eos>, <|end_of_text|> it has).",
    )
    eos_id: int = _f(
        -1,
        "End-of-document id of pre-tokenized inputs (.bin/.npy/Parquet input_ids; -1 = not set, "
        "or the tokenizer's). Separates the documents of a flat .bin/.npy.",
    )
    pad_id: int = _f(
        -1,
        "Id that fills short rows, never a target (-1 = the tokenizer's pad token, else "
        "vocab_size: the first id past the vocabulary).",
    )
    vocab_size: int = _f(
        0, "Number of token ids of pre-tokenized inputs (0 = the tokenizer's); ids must be below."
    )
    token_dtype: str = _f(
        "", "Element type of flat .bin token files: 'uint16' or 'uint32' (.npy files carry theirs)."
    )
    shard_rows: int = _f(100_000, "Rows per corpus Parquet shard.")
    row_group_rows: int = _f(8192, "Rows per Parquet row group.")
    image_size: int = _f(0, "Vision: resize images to this square size (0 = keep; all must match).")
    demo_images: bool = _f(
        False,
        "Build the offline image demo: scikit-learn's digits in visual domains (needs grasp-cli[vision]).",
    )
    demo_image_shares: dict[str, float] = _f(
        {},
        "Image demo: share of the digits in each domain (original, thick, noisy, shifted, rotated, "
        "inverted); empty = built-in.",
    )


@dataclass
class ModelSection:
    kind: str = _f(
        "transformer",
        "'transformer' (byte LM), 'mlp', 'cnn', 'hf' (a Hugging Face causal LM folder, see "
        "model.path; needs grasp-cli[hf]) or 'plugin' (see model.factory).",
    )
    factory: str = _f(
        "",
        "For kind='plugin' only: 'package.module:function' returning a ModelBundle "
        "(set with another kind it is an error, never ignored).",
    )
    path: str = _f(
        "",
        "For kind='hf': a save_pretrained folder (config.json + *.safetensors), loaded offline "
        "with AutoModelForCausalLM; θ0 is these weights as they are.",
    )
    dtype: str = _f(
        "float32",
        "Parameter dtype: 'float32', or 'bfloat16' (kind='hf' only; sketches are accumulated in "
        "float32 either way).",
    )
    n_layer: int = _f(2, "Transformer blocks.")
    n_head: int = _f(2, "Attention heads.")
    d_model: int = _f(64, "Transformer width.")
    hidden: int = _f(128, "MLP hidden width.")
    channels: int = _f(16, "CNN channels in the first conv layer.")
    options: dict[str, Any] = _f(
        {},
        "kind='plugin': free-form options passed to the factory. kind='hf': overrides of "
        "config.json attributes (e.g. {resid_pdrop = 0.0}); each must exist in config.json.",
    )


@dataclass
class ReferenceSection:
    checkpoint: str = _f(
        "",
        "State dict of θ0 (weights_only), used as is; empty = the model's initial weights "
        "(the model.path checkpoint for kind='hf', a seeded init otherwise), trained for "
        "reference.steps steps.",
    )
    slice_fraction: float = _f(0.5, "Fraction of the corpus the reference model is trained on.")
    steps: int = _f(
        AUTO_STEPS,
        "Optimizer steps that train θ0 from the initial weights on a seeded corpus slice; 0 = θ0 "
        f"is the initial weights as they are; -1 = 0 for kind='hf', {DEFAULT_REFERENCE_STEPS} "
        "otherwise.",
    )
    batch_size: int = _f(32, "Sequences per step.")
    lr: float = _f(3e-3, "Peak learning rate (AdamW, cosine decay).")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    warmup_steps: int = _f(20, "Linear warm-up steps.")


@dataclass
class SketchSection:
    projection: str = _f("kronecker", "'gaussian', 'rademacher', 'sjlt' or 'kronecker'.")
    k: int = _f(256, "Sketch dimension; any prefix k' <= k is itself a sketch.")
    kron_dim: int = _f(
        16, "Kronecker: per-side factor dimension (k_in = k_out) for each linear layer."
    )
    sjlt_nnz: int = _f(4, "SJLT: non-zeros per input coordinate.")
    params: list[str] = _f(
        [],
        "Parameter-name globs to sketch (empty with empty sketch.modules = all parameters for "
        "dense kinds, every linear map for kronecker).",
    )
    modules: list[str] = _f(
        [],
        "Module-name globs (fnmatch, e.g. 'transformer.h.*.attn.*'): a module is chosen when its "
        "name or an ancestor's matches. kronecker: the linear maps (nn.Linear, transformers' "
        "Conv1D) among them; dense kinds: all their parameters. Empty = all (unless "
        "sketch.params is set). Adds to sketch.params.",
    )
    exclude_modules: list[str] = _f(
        [],
        "Module-name globs removed from the selection (with everything under them), e.g. "
        "['lm_head'].",
    )
    seed: int = _f(-1, "Projection seed (-1 = derived from run.seed).")
    batch_size: int = _f(64, "Examples per per-example-gradient batch.")
    dtype: str = _f("float32", "Stored sketch dtype: 'float32' or 'float16'.")
    chunk_rows: int = _f(1024, "Rows per Zarr chunk (the unit of sharding and resumption).")
    task_batch_size: int = _f(256, "Examples per batch when accumulating task gradients.")
    projection_cache_mb: int = _f(
        2048,
        "Memory (MiB, per projection, per process) for a dense projection's blocks; blocks "
        "beyond it are regenerated for every batch, which is slower but bounded in memory.",
    )
    trak_k: int = _f(
        0,
        "TRAK's features: dense Gaussian projection (this many dims) of the per-example "
        "gradients of the model output (margin) over all parameters, with out-to-loss weights; "
        "the faithful TRAK baseline and GRASP's 'trak' feature set need it (0 = off).",
    )
    trak_params: list[str] = _f([], "Parameter globs for TRAK's features (empty = all, as TRAK).")
    trak_ref: str = _f(
        "auto",
        "Also run the authors' traker package on θ0 (the trak-ref baseline): 'auto' = when "
        "installed and trak_k > 0, 'on' = required, 'off'.",
    )
    trak_ref_lambdas: list[float] = _f(
        [0.0, 1e-3, 1e-2, 1e-1, 1.0],
        "trak-ref: traker's lambda_reg grid, relative to tr(ΦᵀΦ)/k (chosen on fit subsets).",
    )


@dataclass
class SubsetsSection:
    designs: dict[str, int] = _f(
        {"mixture": 48, "uniform": 16},
        "Subsets to sample per design: 'mixture', 'uniform', 'within', 'given'.",
    )
    eval_fraction: float = _f(0.35, "Fraction of sampled subsets held out for evaluation only.")
    uniform_alpha: float = _f(0.5, "uniform: keep-probability of each example.")
    dirichlet_alpha: float = _f(0.5, "mixture: Dirichlet concentration over domains.")
    size_min: float = _f(0.1, "mixture/within: smallest subset, as a fraction of N.")
    size_max: float = _f(0.5, "mixture/within: largest subset, as a fraction of N.")
    given: str = _f("", "Parquet file of (subset_id, id[, role]) for the 'given' design.")
    seed: int = _f(-1, "Design seed (-1 = derived from run.seed).")


@dataclass
class RetrainSection:
    init: str = _f("reference", "'reference' (continue from θ0) or 'scratch'.")
    steps: int = _f(60, "Optimizer steps per subset (fixed compute, whatever the subset size).")
    batch_size: int = _f(32, "Sequences per step.")
    lr: float = _f(1e-3, "Peak learning rate.")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    warmup_steps: int = _f(5, "Linear warm-up steps.")
    seed: int = _f(-1, "Training seed shared by all subsets (common random numbers; -1 = derived).")
    repeat_subsets: int = _f(
        0, "How many subsets to retrain again with other seeds (noise ceiling)."
    )
    repeat_seeds: int = _f(1, "Extra seeds for each repeated subset.")
    parallel_models: int = _f(1, "Models trained at once with torch.func.vmap (1 = one at a time).")
    eval_batch_size: int = _f(256, "Examples per batch when evaluating tasks.")


@dataclass
class LoopSection:
    subsets: int = _f(
        8, "Closed loop: subsets near each proposal measured per round (beside the proposal)."
    )
    swap: float = _f(0.3, "Closed loop: largest share of a proposal swapped in a perturbation.")
    rounds: int = _f(2, "Closed loop: rounds `scripts/loop.sh` / `make loop` runs.")


@dataclass
class SurrogateSection:
    k_grid: list[int] = _f(
        [],
        "Feature prefix dims k' tried by the LCB protocol besides each set's whole k (a prefix "
        "is a noisier JL sketch; smaller ones only help when fit subsets are very few).",
    )
    feature_grid: list[str] = _f(
        ["sketch", "trak"],
        "Feature sets GRASP may aggregate: 'sketch' (loss-gradient sketches) and 'trak' (TRAK's "
        "Q-weighted output gradients; needs sketch.trak_k > 0).",
    )
    alignment_grid: list[str] = _f(
        ["natural", "kernel"],
        "Task direction of the alignment term: 'plain' (the task gradient g_t), 'natural' "
        "((C+εI)⁻¹ g_t, C = ΦᵀΦ/N), 'kernel' (TRAK's (K+λI)⁻¹ g_t, λ from kernel_ridge_grid).",
    )
    kernel_ridge_grid: list[float] = _f(
        [1e-2, 1e-1, 1.0], "Relative ridges of the 'kernel' alignment (λ · tr(K)/k')."
    )
    quadratic_grid: list[bool] = _f(
        [True, False],
        "With and/or without the quadratic penalty: with both, GRASP's family holds the additive "
        "models (TRAK among them) and the protocol keeps the term only where it earns its place.",
    )
    geometry_grid: list[str] = _f(
        ["identity", "whitened"], "Geometries G: identity, diagonal, whitened."
    )
    ridge_grid: list[float] = _f(
        [10.0, float("inf")], "Residual-correction ridge λ (inf = no correction)."
    )
    aggregation_grid: list[str] = _f(
        ["mean", "sum"], "Subset aggregation: 'mean' (m_S = mean φ) and/or 'sum' (TRAK's)."
    )
    folds: int = _f(5, "K in repeated K-fold cross-validation.")
    repeats: int = _f(2, "Repeats of K-fold.")
    delta: float = _f(0.1, "Failure probability of the lower confidence bound.")
    baseline_ridge_grid: list[float] = _f(
        [1e-3, 1e-1, 10.0], "λ grid (relative) for datamodels and the domain-mixture regression."
    )
    trak_ridge_grid: list[float] = _f(
        [1e-4, 1e-3, 1e-2, 1e-1, 1.0],
        "TRAK's kernel ridge λ (relative to tr(ΨᵀΨ)/k'), from ~0 up; chosen on fit subsets.",
    )
    datamodels_max_n: int = _f(200_000, "Skip datamodels above this corpus size.")
    cost_curve: list[int] = _f(
        [8, 16, 32], "Fit-subset counts for the artifact-cost curve (plus all)."
    )
    bootstrap: int = _f(1000, "Bootstrap resamples for confidence intervals.")
    bootstrap_refits: int = _f(
        0, "Refits of the chosen GRASP model on resampled fit subsets (select.robust='bootstrap')."
    )
    max_excluded_fraction: float = _f(
        0.1,
        "Subsets with non-finite utilities are excluded and reported; more than this fraction is an error.",
    )
    seed: int = _f(-1, "Seed for folds and bootstrap (-1 = derived).")


@dataclass
class ScoreSection:
    reference: str = _f("corpus", "Reference set for example gains: 'corpus' or 'selection'.")
    subsets: str = _f("", "Parquet file of (subset_id, id) to score; empty = the sampled subsets.")
    chunk_rows: int = _f(65536, "Examples per part file of example scores.")


@dataclass
class SelectSection:
    budget: int | float = _f(
        0.25,
        "Subset size: a whole count (an integer, e.g. 600) or a fraction of N in (0, 1] "
        "(a number with a decimal point, e.g. 0.25; 1.0 = the whole corpus).",
    )
    algorithm: str = _f(
        "auto", "'greedy' (exact lazy greedy), 'stream' (iterated linearization), 'auto'."
    )
    task_weights: dict[str, float] = _f({}, "Weight per task (missing = 1).")
    domain_caps: dict[str, float] = _f({}, "Max share (<= 1) or count (> 1) per domain.")
    robust: str = _f(
        "none", "'none', 'tasks' (LCB across tasks) or 'bootstrap' (LCB across refits)."
    )
    robust_kappa: float = _f(1.0, "Robust mode: mean - kappa * std.")
    trust_region: str = _f(
        "none",
        "'mixture': keep the selection where the surrogate was fitted — each domain's share at "
        "most its largest share in a fit subset (caps on top of domain_caps); 'none'.",
    )
    max_iters: int = _f(20, "Stream: most passes over the sketches.")
    greedy_max_n: int = _f(50_000, "auto: exact greedy up to this N, stream above.")
    block_rows: int = _f(262_144, "Stream: rows read per block.")
    curation: bool = _f(
        True,
        "Write the curation check's selections: GRASP's and every selector of curation_selectors.",
    )
    curation_selectors: list[str] = _f(
        [
            "grasp-trust",
            "random",
            "additive",
            "trak",
            "domain-match",
            "regmix",
            "dsir",
            "dsir-ref",
            "whole",
        ],
        "Selections trained beside GRASP's (same budget and recipe): 'grasp-trust' (GRASP "
        "within the trust region of select.trust_region = 'mixture'); 'random'; 'additive' "
        "(GRASP without the quadratic term, top-B); 'trak' (faithful TRAK top-B); 'domain-match' "
        "(the budget spread over the tasks' corpus domains); 'regmix' (the mixture regression's "
        "best mixture); 'dsir' / 'dsir-ref' (hashed n-gram importance resampling, ours / the "
        "authors' package); 'whole' (the whole corpus, a reference line). Selectors a run cannot "
        "make are skipped with the reason recorded.",
    )
    curation_seeds: int = _f(
        3, "Seeds each curation selection is trained with (mean ± std and paired differences)."
    )


@dataclass
class GraspConfig:
    run: RunSection = field(default_factory=RunSection)
    prepare: PrepareSection = field(default_factory=PrepareSection)
    model: ModelSection = field(default_factory=ModelSection)
    reference: ReferenceSection = field(default_factory=ReferenceSection)
    sketch: SketchSection = field(default_factory=SketchSection)
    subsets: SubsetsSection = field(default_factory=SubsetsSection)
    retrain: RetrainSection = field(default_factory=RetrainSection)
    loop: LoopSection = field(default_factory=LoopSection)
    surrogate: SurrogateSection = field(default_factory=SurrogateSection)
    score: ScoreSection = field(default_factory=ScoreSection)
    select: SelectSection = field(default_factory=SelectSection)

    def section_dict(self, name: str) -> dict[str, Any]:
        return dataclasses.asdict(getattr(self, name))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def derived_seed(self, explicit: int, salt: str) -> int:
        """``explicit`` when >= 0, else a stable seed derived from run.seed and ``salt``."""
        if explicit >= 0:
            return explicit
        digest = hashlib.sha256(f"{self.run.seed}:{salt}".encode()).digest()
        return int.from_bytes(digest[:4], "little")

    def seed(self, name: str) -> int:
        """The seed of one named random stream: a section's own ``seed`` key when it has one and
        it is set (>= 0), else derived from ``run.seed`` and the name (see ``derived_seed``).

        Streams: sketch, subsets, retrain (the base training seed), surrogate (folds and
        bootstrap), reference, model-init, prepare, curation-random, bootstrap-refits.
        """
        section = getattr(self, name, None)
        explicit = getattr(section, "seed", -1) if section is not None else -1
        return self.derived_seed(explicit, name)


# Keys that change how fast a stage runs, never what it computes: left out of artifact hashes.
NON_SEMANTIC_KEYS = {
    "run": {"device", "threads"},
    "sketch": {"batch_size", "task_batch_size", "projection_cache_mb"},
    "retrain": {"parallel_models", "eval_batch_size"},
    "select": {"block_rows"},
}


def semantic_section(config: GraspConfig, name: str) -> dict[str, Any]:
    """A section's values that decide an artifact's contents (speed knobs left out)."""
    values = config.section_dict(name)
    for key in NON_SEMANTIC_KEYS.get(name, ()):
        values.pop(key, None)
    return values


def sections_hash(config: GraspConfig, sections: list[str]) -> str:
    """Stable hash of the named sections: what an artifact's validity depends on."""
    payload = {name: semantic_section(config, name) for name in sections}
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


# ---------------------------------------------------------------- loading


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints widen to floats. Raises ConfigError."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (list,):
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list of {_type_name(item_tp)}, got {value!r}")
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin in (dict,):
        key_tp, val_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {value!r}")
        return {str(k): _coerce(v, val_tp, f"{where}.{k}") for k, v in value.items()}
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _coerce(value, option, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: {value!r} has the wrong type")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and value.lower() in ("inf", "+inf", "infinity"):
            return float("inf")
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    raise ConfigError(f"{where}: unsupported type {tp}")


def _apply_table(config: GraspConfig, table: dict[str, Any], source: str) -> None:
    hints = typing.get_type_hints(GraspConfig)
    for section_name, section_values in table.items():
        if section_name not in hints:
            known = ", ".join(hints)
            raise ConfigError(f"{source}: unknown section [{section_name}] (known: {known})")
        if not isinstance(section_values, dict):
            raise ConfigError(f"{source}: [{section_name}] must be a table")
        section = getattr(config, section_name)
        section_hints = typing.get_type_hints(type(section))
        for key, value in section_values.items():
            if key not in section_hints:
                known = ", ".join(section_hints)
                raise ConfigError(f"{source}: unknown key {section_name}.{key} (known: {known})")
            coerced = _coerce(value, section_hints[key], f"{source}: {section_name}.{key}")
            setattr(section, key, coerced)


def _parse_override_value(text: str) -> Any:
    """Parse the right-hand side of ``--set a.b=VALUE`` as a TOML value, else keep the string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        if text.lower() in ("inf", "+inf"):
            return float("inf")
        return text


def parse_overrides(items: list[str] | None) -> dict[str, dict[str, Any]]:
    """``--set section.key=value`` items as ``{section: {key: value}}`` (TOML values)."""
    table: dict[str, dict[str, Any]] = {}
    for item in items or []:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        dotted, raw = item.split("=", 1)
        section, key = dotted.strip().split(".", 1)
        table.setdefault(section, {})[key] = _parse_override_value(raw.strip())
    return table


def load_config(
    path: Path | None,
    overrides: list[str] | None = None,
    run: Path | None = None,
    fresh: tuple[str, ...] = (),
) -> GraspConfig:
    """The configuration a stage runs with, in layers (each overrides the one before):

    1. the defaults;
    2. the run's ``RUN/config.toml`` — what earlier stages were made with (``fresh`` sections
       excepted: ``prepare`` states its corpus afresh);
    3. the TOML file (``--config``);
    4. the run's remembered command-line keys (``[command_line]`` in ``RUN/config.toml``:
       flags and ``--set`` of earlier stages), so a ``--budget`` stays in force over the file
       until it is set again;
    5. this command's ``--set`` (then the stage's flags, applied by the caller).
    """
    config = GraspConfig()
    given = parse_overrides(overrides)
    remembered: dict[str, dict[str, Any]] = {}
    if run is not None:
        recorded = read_run_config(run)
        sections = {k: v for k, v in recorded.items() if k != COMMAND_LINE and k not in fresh}
        apply_run_config(config, sections, run)
        for section, keys in recorded.get(COMMAND_LINE, {}).items():
            if section in fresh or not isinstance(keys, dict):
                continue
            kept = {k: v for k, v in keys.items() if k not in given.get(section, {})}
            if kept:
                remembered[section] = kept
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            table = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: invalid TOML: {exc}") from None
        _apply_table(config, table, str(path))
    if remembered:
        _apply_table(config, remembered, f"{Path(run) / RUN_CONFIG} [{COMMAND_LINE}]")
    _apply_table(config, given, "--set")
    validate(config)
    return resolve_auto(config)


_CHOICES = {
    ("model", "kind"): ("transformer", "mlp", "cnn", "hf", "plugin"),
    ("model", "dtype"): ("float32", "bfloat16"),
    ("sketch", "projection"): ("gaussian", "rademacher", "sjlt", "kronecker"),
    ("sketch", "dtype"): ("float32", "float16"),
    ("retrain", "init"): ("reference", "scratch"),
    ("select", "algorithm"): ("auto", "greedy", "stream"),
    ("select", "robust"): ("none", "tasks", "bootstrap"),
    ("sketch", "trak_ref"): ("auto", "on", "off"),
    ("select", "trust_region"): ("none", "mixture"),
    ("score", "reference"): ("corpus", "selection"),
    ("prepare", "token_dtype"): ("", "uint16", "uint32"),
}


def validate(config: GraspConfig) -> None:
    """Cross-field checks that types alone cannot express."""
    for (section, key), choices in _CHOICES.items():
        value = getattr(getattr(config, section), key)
        if value not in choices:
            raise ConfigError(f"{section}.{key} = {value!r}: choose one of {', '.join(choices)}")
    for alignment in config.surrogate.alignment_grid:
        if alignment not in ("plain", "natural", "kernel"):
            raise ConfigError(f"surrogate.alignment_grid: unknown alignment {alignment!r}")
    for feature_set in config.surrogate.feature_grid:
        if feature_set not in ("sketch", "trak"):
            raise ConfigError(f"surrogate.feature_grid: unknown feature set {feature_set!r}")
    for name in ("kernel_ridge_grid", "trak_ridge_grid"):
        for value in getattr(config.surrogate, name):
            if not value > 0 or not math.isfinite(value):
                raise ConfigError(f"surrogate.{name}: {value!r} must be a finite number > 0")
    if not config.surrogate.quadratic_grid:
        raise ConfigError("surrogate.quadratic_grid must list true and/or false")
    for geometry in config.surrogate.geometry_grid:
        if geometry not in ("identity", "diagonal", "whitened"):
            raise ConfigError(f"surrogate.geometry_grid: unknown geometry {geometry!r}")
    for aggregation in config.surrogate.aggregation_grid:
        if aggregation not in ("mean", "sum"):
            raise ConfigError(f"surrogate.aggregation_grid: unknown aggregation {aggregation!r}")
    known = (
        "grasp-trust",
        "random",
        "additive",
        "trak",
        "domain-match",
        "regmix",
        "dsir",
        "dsir-ref",
        "whole",
    )
    for selector in config.select.curation_selectors:
        if selector not in known:
            raise ConfigError(
                f"select.curation_selectors: unknown selector {selector!r} (choose from {', '.join(known)})"
            )
    for design in config.subsets.designs:
        if design not in ("mixture", "uniform", "within", "given"):
            raise ConfigError(f"subsets.designs: unknown design {design!r}")
    _validate_model(config)
    positive = [
        ("prepare", "seq_len"),
        ("prepare", "shard_rows"),
        ("prepare", "row_group_rows"),
        ("reference", "batch_size"),
        ("reference", "lr"),
        ("sketch", "k"),
        ("sketch", "kron_dim"),
        ("sketch", "sjlt_nnz"),
        ("sketch", "batch_size"),
        ("sketch", "chunk_rows"),
        ("sketch", "task_batch_size"),
        ("retrain", "steps"),
        ("retrain", "batch_size"),
        ("retrain", "lr"),
        ("retrain", "parallel_models"),
        ("retrain", "eval_batch_size"),
        ("select", "curation_seeds"),
        ("loop", "subsets"),
        ("surrogate", "folds"),
        ("surrogate", "repeats"),
        ("score", "chunk_rows"),
        ("select", "max_iters"),
        ("select", "block_rows"),
        ("prepare", "demo_repeat_copies"),
    ]
    for section, key in positive:
        value = getattr(getattr(config, section), key)
        if not value > 0 or not math.isfinite(value):
            raise ConfigError(f"{section}.{key} = {value!r} must be a positive number")
    non_negative = [
        ("run", "threads"),
        ("sketch", "projection_cache_mb"),
        ("prepare", "max_docs_per_domain"),
        ("prepare", "max_seqs_per_domain"),
        ("prepare", "max_task_seqs"),
        ("prepare", "image_size"),
        ("reference", "weight_decay"),
        ("reference", "warmup_steps"),
        ("retrain", "weight_decay"),
        ("retrain", "warmup_steps"),
        ("retrain", "repeat_subsets"),
        ("retrain", "repeat_seeds"),
        ("surrogate", "bootstrap"),
        ("surrogate", "bootstrap_refits"),
        ("surrogate", "datamodels_max_n"),
        ("sketch", "trak_k"),
        ("select", "robust_kappa"),
        ("select", "greedy_max_n"),
    ]
    for section, key in non_negative:
        value = getattr(getattr(config, section), key)
        if not value >= 0 or not math.isfinite(value):
            raise ConfigError(f"{section}.{key} = {value!r} must be >= 0")
    if config.reference.steps < AUTO_STEPS:
        raise ConfigError(
            f"reference.steps = {config.reference.steps} must be >= 0 (-1 = the model kind's default)"
        )
    fractions = [
        ("prepare", "holdout_fraction", False, False),
        ("prepare", "demo_repeat_fraction", True, True),
        ("reference", "slice_fraction", False, True),
        ("subsets", "eval_fraction", False, False),
        ("subsets", "uniform_alpha", False, False),
        ("subsets", "size_min", False, True),
        ("subsets", "size_max", False, True),
        ("surrogate", "delta", False, False),
        ("surrogate", "max_excluded_fraction", True, True),
        ("loop", "swap", False, True),
    ]
    for section, key, low_ok, high_ok in fractions:
        value = getattr(getattr(config, section), key)
        inside = (value >= 0 if low_ok else value > 0) and (value <= 1 if high_ok else value < 1)
        if not inside:
            interval = f"{'[' if low_ok else '('}0, 1{']' if high_ok else ')'}"
            raise ConfigError(f"{section}.{key} = {value!r} must lie in {interval}")
    if config.subsets.size_min > config.subsets.size_max:
        raise ConfigError(
            f"subsets.size_min = {config.subsets.size_min} is above "
            f"subsets.size_max = {config.subsets.size_max}"
        )
    if not config.subsets.dirichlet_alpha > 0 or not math.isfinite(config.subsets.dirichlet_alpha):
        raise ConfigError("subsets.dirichlet_alpha must be a positive number")
    for design, count in config.subsets.designs.items():
        if count < 0:
            raise ConfigError(f"subsets.designs.{design} = {count} must be >= 0 (a subset count)")
    if max(config.surrogate.k_grid, default=0) > config.sketch.k:
        raise ConfigError(
            f"surrogate.k_grid {config.surrogate.k_grid} asks for more dims than sketch.k = {config.sketch.k}"
        )
    if any(k <= 0 for k in config.surrogate.k_grid):
        raise ConfigError(f"surrogate.k_grid {config.surrogate.k_grid} must list positive dims")
    for name, weight in config.select.task_weights.items():
        if not math.isfinite(weight) or weight < 0:
            raise ConfigError(
                f"select.task_weights.{name} = {weight!r} must be a finite number >= 0"
            )
    for name, cap in config.select.domain_caps.items():
        if not math.isfinite(cap) or cap < 0:
            raise ConfigError(f"select.domain_caps.{name} = {cap!r} must be a finite number >= 0")
    for key in ("eos_id", "pad_id"):
        if getattr(config.prepare, key) < -1:
            raise ConfigError(
                f"prepare.{key} = {getattr(config.prepare, key)} must be >= 0 (-1 = not set)"
            )
    if config.prepare.vocab_size < 0:
        raise ConfigError(
            f"prepare.vocab_size = {config.prepare.vocab_size} must be >= 0 (0 = not set)"
        )
    if config.prepare.eos_token and config.prepare.tokenizer == "bytes":
        raise ConfigError("prepare.eos_token names a token of prepare.tokenizer, which is 'bytes'")
    if config.prepare.eos_token and config.prepare.eos_id >= 0:
        raise ConfigError("prepare.eos_token and prepare.eos_id both name the EOS; keep one")
    for name in config.prepare.tasks:
        check_safe_name(name, "prepare.tasks: task name")
    for name in config.prepare.holdout_domains:
        check_safe_name(name, "prepare.holdout_domains: domain (it names a task file)")
    both = sorted(set(config.prepare.tasks) & set(config.prepare.holdout_domains))
    if both:
        raise ConfigError(
            f"task {both[0]!r} is given as a --task file and as a held-out domain; the held-out "
            "documents would be silently replaced: rename the --task or drop the domain"
        )
    check_budget(config.select.budget)


def _validate_model(config: GraspConfig) -> None:
    """model.* keys that only make sense together: never a key that is silently ignored."""
    model = config.model
    if model.kind == "plugin" and ":" not in model.factory:
        raise ConfigError(
            "model.factory must be 'package.module:function' when model.kind = 'plugin'"
        )
    if model.factory and model.kind != "plugin":
        raise ConfigError(
            f"model.factory = {model.factory!r} is set but model.kind = {model.kind!r}: a factory "
            "is used only with model.kind = 'plugin' (set it, or drop model.factory)"
        )
    if model.kind == "hf" and not model.path:
        raise ConfigError(
            "model.kind = 'hf' needs model.path = a save_pretrained folder "
            "(config.json + *.safetensors)"
        )
    if model.path and model.kind != "hf":
        raise ConfigError(
            f"model.path = {model.path!r} is set but model.kind = {model.kind!r}: a model folder "
            "is loaded only with model.kind = 'hf'"
        )
    if model.options and model.kind not in ("plugin", "hf"):
        raise ConfigError(
            f"model.options is set but model.kind = {model.kind!r}: options go to a plugin "
            "factory or override a Hugging Face config.json (kinds 'plugin', 'hf')"
        )
    if model.dtype != "float32" and model.kind != "hf":
        raise ConfigError(
            f"model.dtype = {model.dtype!r} needs model.kind = 'hf' (the built-in models train "
            "in float32)"
        )
    if model.kind == "hf" and config.retrain.parallel_models > 1:
        raise ConfigError(
            "retrain.parallel_models > 1 stacks models with torch.func.vmap, which Hugging Face "
            "models do not support (data-dependent masking): use 1 and more shards"
        )


def resolve_auto(config: GraspConfig) -> GraspConfig:
    """Replace "the kind's default" values by concrete ones (in place; returns ``config``).

    ``reference.steps = -1`` becomes 0 for kind = 'hf' (the user's checkpoint is θ0 as it is)
    and 300 otherwise (a fresh model is trained first). Artifacts then record, and hash, the
    number of steps that actually ran.
    """
    if config.reference.steps == AUTO_STEPS:
        config.reference.steps = 0 if config.model.kind == "hf" else DEFAULT_REFERENCE_STEPS
    return config


def check_budget(budget: int | float) -> None:
    """``select.budget``: an integer count >= 1, or a fraction of the corpus in (0, 1].

    A float above 1 must be whole (``600.0`` is the count 600); ``1.5``, NaN and infinities
    are errors, so a budget never means something other than what was typed.
    """
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise ConfigError(f"select.budget = {budget!r}: expected a count or a fraction")
    if isinstance(budget, float) and not math.isfinite(budget):
        raise ConfigError(f"select.budget = {budget!r} must be a finite count or fraction")
    if budget <= 0:
        raise ConfigError(f"select.budget = {budget!r} must be positive")
    if isinstance(budget, float) and budget > 1 and budget != math.floor(budget):
        raise ConfigError(
            f"select.budget = {budget!r} is neither a fraction in (0, 1] nor a whole count"
        )


def parse_budget(text: str) -> int | float:
    """``--budget TEXT``: ``600`` is a count, ``0.25`` or ``1.0`` a fraction (see ``check_budget``)."""
    value = _parse_override_value(text.strip())
    if isinstance(value, str):
        raise ConfigError(
            f"--budget {text!r}: expected a count (e.g. 600) or a fraction (e.g. 0.25)"
        )
    check_budget(value)
    return value


def toml_value(value: Any) -> str:
    """One value as TOML: booleans, integers, floats (``inf``, ``nan``), strings, arrays and
    inline tables — everything a config field holds."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a TOML basic string is a JSON string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        items = ", ".join(f"{toml_key(str(k))} = {toml_value(v)}" for k, v in value.items())
        return "{" + (f" {items} " if items else "") + "}"
    raise ConfigError(f"cannot write {value!r} ({type(value).__name__}) as TOML")


def toml_key(key: str) -> str:
    """A bare key when TOML allows it, else a quoted one."""
    if key and all(c.isalnum() or c in "_-" for c in key) and key.isascii():
        return key
    return json.dumps(key, ensure_ascii=False)


def to_toml(config: GraspConfig, sections: list[str] | None = None) -> str:
    """The config (or the named sections) as a TOML document that ``load_config`` reads back."""
    lines: list[str] = []
    for section in dataclasses.fields(config):
        if sections is not None and section.name not in sections:
            continue
        lines.append(f"[{section.name}]")
        for item in dataclasses.fields(getattr(config, section.name)):
            value = getattr(getattr(config, section.name), item.name)
            lines.append(f"{item.name} = {toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def describe(config: GraspConfig) -> str:
    """The resolved config as valid TOML (for --dry-run: it can be saved and reused)."""
    return to_toml(config)


RUN_CONFIG = "config.toml"
COMMAND_LINE = "command_line"  # RUN/config.toml's table of keys set by flags and --set


def read_run_config(run: Path) -> dict[str, Any]:
    """``RUN/config.toml``, the configuration the run's stages were made with ({} if none)."""
    path = Path(run) / RUN_CONFIG
    if not path.is_file():
        return {}
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: invalid TOML ({exc}); fix or delete it") from None


def apply_run_config(config: GraspConfig, table: dict[str, Any], run: Path) -> None:
    """Start from what the run recorded (before --config, --set and flags are applied)."""
    table = {k: v for k, v in table.items() if k != COMMAND_LINE}
    if table:
        _apply_table(config, table, str(Path(run) / RUN_CONFIG))


def config_changes(before: GraspConfig, after: GraspConfig) -> dict[str, dict[str, Any]]:
    """``{section: {key: value}}`` of the keys whose values differ from ``before`` to ``after``
    (what a stage's flags set)."""
    changes: dict[str, dict[str, Any]] = {}
    for section in dataclasses.fields(after):
        old, new = getattr(before, section.name), getattr(after, section.name)
        for item in dataclasses.fields(new):
            value = getattr(new, item.name)
            if getattr(old, item.name) != value:
                changes.setdefault(section.name, {})[item.name] = value
    return changes


def command_line_toml(table: dict[str, dict[str, Any]]) -> str:
    """The ``[command_line]`` table of ``RUN/config.toml`` as TOML text."""
    lines = []
    for section in sorted(table):
        if table[section]:
            lines.append(f"[{COMMAND_LINE}.{section}]")
            lines += [f"{toml_key(k)} = {toml_value(v)}" for k, v in sorted(table[section].items())]
            lines.append("")
    return "\n".join(lines)
