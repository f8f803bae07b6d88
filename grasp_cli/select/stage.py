"""`grasp select`: the budget-B subset with the best predicted utility -> ``RUN/selection/``.

Writes ``selected.parquet`` (id, rank, objective_gain, domain) and, for the curation check,
``curation.parquet`` (selection, id) with the GRASP selection, a seeded random
selection and the additive top-B selection of the same size.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from grasp_cli.artifacts.atomic import artifact_dir
from grasp_cli.artifacts.examples import BYTE_PAD_ID, BYTE_VOCAB_SIZE, open_corpus
from grasp_cli.artifacts.manifest import build_manifest, folder_digest, require, write_manifest
from grasp_cli.artifacts.sketches import masked_row_sum, open_sketches
from grasp_cli.artifacts.tables import write_table
from grasp_cli.context import StageContext
from grasp_cli.errors import GraspError, InputError
from grasp_cli.select import (
    Selection,
    additive_top_b,
    budget_count,
    domain_caps,
    iter_blocks,
    objective_from_bootstrap,
    objective_from_tasks,
    select,
)
from grasp_cli.select.export import export_mode, write_export
from grasp_cli.select.objective import aggregation_scale
from grasp_cli.surrogate.store import StoredSurrogate, load_surrogate


def build_objective(stored: StoredSurrogate, section: Any, budget: int):
    """F(S) = Σ_t w_t Û_t(S)/σ_t from the fitted surrogate (σ_t: std of measured fit utilities).

    ``section``: the ``[select]`` values (task weights, robust mode and κ).
    """
    model = stored.model
    unknown = sorted(set(section.task_weights) - set(model.task_names))
    if unknown:
        raise InputError(
            f"select.task_weights names unknown task(s) {unknown}; tasks: {model.task_names}"
        )
    weights = np.array([section.task_weights.get(name, 1.0) for name in model.task_names])
    if not np.isfinite(weights).all() or (weights < 0).any():
        raise InputError(f"select.task_weights must be finite and >= 0, got {section.task_weights}")
    if not weights.sum() > 0:
        raise InputError(
            "select.task_weights gives every task weight 0: nothing to select for; "
            "give at least one task a positive weight"
        )
    sigma = np.where(stored.utility_std > 0, stored.utility_std, 1.0)
    scale = aggregation_scale(model.aggregation, budget, sum_scale=1.0 / float(model.n_ref_))
    if section.robust == "bootstrap":
        if stored.bootstrap is None:
            raise InputError(
                "select.robust = 'bootstrap' needs bootstrap refits; refit with surrogate.bootstrap_refits > 0"
            )
        boot = stored.bootstrap
        refits = [
            (
                boot["linear"][r],
                boot["curvature"][r][:, None, None] * model.metric_[None],
                boot["intercepts"][r],
            )
            for r in range(boot["linear"].shape[0])
        ]
        return objective_from_bootstrap(refits, scale, weights, sigma, section.robust_kappa)
    quadratic = np.stack([model.quadratic_matrix(t) for t in range(model.n_tasks)])
    return objective_from_tasks(
        model.linear_vectors,
        quadratic,
        model.intercepts_,
        scale,
        weights,
        sigma,
        robust=section.robust,
        kappa=section.robust_kappa,
    )


@dataclass
class SelectInputs:
    stored: StoredSurrogate
    phi: Any  # [N, k] sketch matrix, streamed (Zarr) or in memory
    ids: np.ndarray  # [N]
    codes: np.ndarray  # [N] domain codes
    domain_names: list[str]


def load_select_inputs(ctx: StageContext) -> SelectInputs:
    layout = ctx.layout
    require(layout, "sketches", ctx.config, force=ctx.force)
    require(layout, "surrogate", ctx.config, force=ctx.force)
    stored = load_surrogate(layout.surrogate)
    sketches = open_sketches(layout.sketches)
    corpus = open_corpus(layout.corpus)  # ids and domains: columns only
    sketches.check_ids(corpus)
    codes, names = corpus.domain_codes()
    phi = sketches.matrix(stored.model.feature_set)
    return SelectInputs(stored, phi, sketches.ids, codes, names)


# The curation check's "whole" corpus line stands for every row; its rows are never listed
# (curation.parquet and the predictions leave it out), so none are held.
WHOLE = np.empty(0, dtype=np.int64)


@dataclass
class SelectOutputs:
    selection: Selection
    budget: int
    curation: dict[str, np.ndarray]  # selector name -> row indices (empty when off; WHOLE)
    extra: dict[str, Any]  # what the manifest records


def choose(
    inputs: SelectInputs, section: Any, seed_of: Any, progress: bool, curation_data: Any = None
) -> SelectOutputs:
    """The selection (and the curation check's other selections), on arrays.

    ``seed_of(name)`` gives each selector's seed; ``curation_data`` (a ``CurationData``) what
    the non-sketch selectors need (task domains, texts, TRAK's features).
    """
    phi, n = inputs.phi, len(inputs.ids)
    budget = budget_count(section.budget, n)
    caps = (
        domain_caps(section.domain_caps, inputs.domain_names, budget)
        if section.domain_caps
        else None
    )
    if section.trust_region == "mixture":
        caps = trust_region_caps(inputs, budget, caps)
    objective = build_objective(inputs.stored, section, budget)
    selection = select(
        phi,
        objective,
        budget,
        section.algorithm,
        inputs.codes,
        caps,
        section.greedy_max_n,
        section.max_iters,
        section.block_rows,
        progress,
    )
    rows = np.asarray(selection.indices)
    extra: dict[str, Any] = {
        "budget": budget,
        "algorithm": selection.algorithm,
        "passes": selection.passes,
        "converged": bool(selection.converged),
        "objective": float(selection.value),
        "history": list(selection.history)[:100],
    }
    model = inputs.stored.model
    aggregate = masked_row_sum(phi, row_mask(n, rows), objective.dim) * objective.scale
    predicted = model.predict_aggregates(aggregate[None])[0]
    extra["predicted_utilities"] = dict(zip(model.task_names, map(float, predicted), strict=True))
    curation: dict[str, np.ndarray] = {}
    if section.curation:
        curation, skipped, predicted = curation_selections(
            inputs, section, objective, budget, caps, rows, seed_of, curation_data
        )
        extra["curation_skipped"] = skipped
        extra["predicted_objective"] = predicted
        extra["selections"] = {
            name: int(n if name == "whole" else len(r)) for name, r in curation.items()
        }
        if curation_data is not None and curation_data.content is not None:
            chosen = {name: rows for name, rows in curation.items() if name != "whole"}
            # hashed after every selection is made, and sorted in place last: 8 bytes a row
            extra["repeats"] = repeats_table(curation_data.content(), chosen)
    return SelectOutputs(selection, budget, curation, extra)


def repeats_table(content: np.ndarray, selections: dict[str, np.ndarray]) -> dict[str, dict]:
    """Per selection (and the corpus): ``slots`` spent on rows whose content another selected
    row already has, and their ``share`` of the selection — what a selector that models
    redundancy should keep low when the corpus repeats itself. Sorts ``content`` in place."""
    from grasp_cli.select.curation import repeated_share

    out = {}
    for name, rows in selections.items():
        slots, share = repeated_share(content, rows)
        out[name] = {"rows": len(rows), "slots": slots, "share": share}
    content.sort()  # in place (the caller's array): the corpus's repeats without a copy
    n = len(content)
    changes = sum(  # adjacent sorted values that differ, compared a block at a time
        int(np.count_nonzero(content[lo + 1 : hi + 1] != content[lo:hi]))
        for lo, hi in ((lo, min(lo + 65536, n - 1)) for lo in range(0, n - 1, 65536))
    )
    distinct = changes + 1 if n else 0
    slots = len(content) - distinct
    return {
        "corpus": {"rows": len(content), "slots": slots, "share": slots / max(len(content), 1)},
        **out,
    }


class RowTexts:
    """What each corpus row says (``dsir.row_text``), read from the corpus block by block each
    time it is iterated: DSIR reads the corpus twice without holding its texts."""

    def __init__(self, corpus: Path, n: int, pad_id: int | None, byte_vocab: bool) -> None:
        self.corpus, self.n, self.pad_id, self.byte_vocab = corpus, n, pad_id, byte_vocab

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[str]:
        from grasp_cli.artifacts.examples import iter_example_blocks
        from grasp_cli.select.dsir import row_text

        for _, block in iter_example_blocks(self.corpus, 0, self.n, 4096):
            for row in block.fields["tokens"]:
                yield row_text(row, self.pad_id, self.byte_vocab)


@dataclass
class CurationData:
    """What selectors other than GRASP need, read from the run."""

    task_domains: list[int]  # corpus domain codes the tasks were held out of ([] if none)
    texts: RowTexts | None  # what each corpus row says, streamed (None: not text)
    task_texts: dict[str, list[str]] | None
    trak_rows: Any  # Q_i ψ_i rows (streamable) or None
    dirichlet_alpha: float
    open_rows: np.ndarray | None = None  # the closed loop's first proposal (open-loop GRASP)
    content: Callable[[], np.ndarray] | None = None  # uint64 [N] row hashes, computed when asked


def curation_selections(
    inputs: SelectInputs,
    section: Any,
    objective: Any,
    budget: int,
    caps: np.ndarray | None,
    grasp_rows: np.ndarray,
    seed_of: Any,
    data: CurationData | None,
) -> tuple[dict[str, np.ndarray], dict[str, str], dict[str, float]]:
    """(selector -> rows, selector -> why skipped, selector -> GRASP's predicted objective)."""
    from grasp_cli.select import curation as picks
    from grasp_cli.select.dsir import dsir_rows

    n = len(inputs.ids)
    stored = inputs.stored
    weights = task_objective_weights(stored, section)
    chosen: dict[str, np.ndarray] = {"grasp": grasp_rows}
    skipped: dict[str, str] = {}
    if data is not None and data.open_rows is not None:  # the loop ran: GRASP before it, too
        chosen["grasp-open"] = data.open_rows
    for name in section.curation_selectors:
        if name == "grasp-trust":
            if "fit_mixture" not in stored.params:
                skipped[name] = "no domain labels: no mixture trust region"
                continue
            trusted = select(
                inputs.phi,
                objective,
                budget,
                section.algorithm,
                inputs.codes,
                trust_region_caps(inputs, budget, caps),
                section.greedy_max_n,
                section.max_iters,
                section.block_rows,
                False,
            )
            chosen[name] = np.sort(np.asarray(trusted.indices))
        elif name == "random":
            chosen[name] = picks.random_rows(n, budget, seed_of("curation-random"))
        elif name == "additive":
            additive = additive_top_b(
                inputs.phi, objective, budget, inputs.codes, caps, section.block_rows
            )
            chosen[name] = np.sort(np.asarray(additive.indices))
        elif name == "whole":  # every row: no row list held (an [N] array), see WHOLE
            chosen[name] = WHOLE
        elif name == "trak":
            if "trak_directions" not in stored.baselines or data is None:
                skipped[name] = "no fitted TRAK baseline"
                continue
            info = stored.params.get("baselines", {}).get("trak", {})
            rows = data.trak_rows if info.get("features") == "trak" else inputs.phi
            if rows is None:
                skipped[name] = "TRAK's features are not in the sketches"
                continue
            per_task = (
                stored.baselines["trak_directions"]
                * (stored.baselines["trak_slope"] * weights)[:, None]
            )
            direction = per_task.sum(axis=0)  # the objective's per-example TRAK score
            chosen[name] = streamed_top_rows(rows, direction, budget)
        elif name == "domain-match":
            if data is None or not data.task_domains:
                skipped[name] = "the tasks are not corpus domains"
                continue
            chosen[name] = picks.domain_match_rows(
                inputs.codes, data.task_domains, budget, seed_of("curation-domain-match")
            )
        elif name == "regmix":
            if "regmix_coef" not in stored.baselines or data is None:
                skipped[name] = "no fitted domain-mixture regression"
                continue
            chosen[name], _ = picks.regmix_rows(
                inputs.codes,
                stored.baselines["regmix_coef"],
                weights,
                budget,
                data.dirichlet_alpha,
                seed_of("curation-regmix"),
            )
        elif name in ("dsir", "dsir-ref"):
            if data is None or data.texts is None:
                skipped[name] = "DSIR's hashed n-grams need a text corpus"
                continue
            if name == "dsir":
                chosen[name] = dsir_rows(
                    data.texts, data.task_texts, budget, seed_of("curation-dsir")
                )
            else:
                try:
                    from grasp_cli.anchors.dsir_ref import dsir_reference

                    ids, _ = dsir_reference(
                        np.arange(n),
                        data.texts,
                        data.task_texts,
                        budget,
                        seed_of("curation-dsir"),
                        with_weights=False,
                    )
                    chosen[name] = ids
                except GraspError as exc:
                    skipped[name] = str(exc)
    predicted = {
        name: float(objective.value(masked_row_sum(inputs.phi, row_mask(n, rows), objective.dim)))
        for name, rows in chosen.items()
        if name != "whole" and len(rows) == budget
    }
    return chosen, skipped, predicted


def row_mask(n: int, rows: np.ndarray) -> np.ndarray:
    """bool ``[N]``, True at ``rows``."""
    mask = np.zeros(n, dtype=bool)
    mask[np.asarray(rows, dtype=np.int64)] = True
    return mask


def streamed_top_rows(rows: Any, direction: np.ndarray, budget: int) -> np.ndarray:
    """The ``budget`` rows with the highest ``row · direction`` (ties: lower row first), sorted,
    read block by block (``O(B)`` held: ``picks.top_rows`` without the ``[N]`` scores)."""
    from grasp_cli.select.stream import StreamingTopB

    best = StreamingTopB(budget, keep_rows=False)
    for start, block in iter_blocks(rows, 65536, len(direction)):
        best.push(np.arange(start, start + len(block)), block @ direction)
    return np.sort(best.result()[0])


def trust_region_caps(inputs: SelectInputs, budget: int, caps: np.ndarray | None) -> np.ndarray:
    """Per-domain caps that keep the selection's mixture where the surrogate was fitted: each
    domain at most its largest share in a fit subset (``ceil(share · B)``), within ``caps``."""
    fitted = inputs.stored.params.get("fit_mixture")
    if not fitted:
        raise InputError("select.trust_region = 'mixture' needs domain labels in the fit subsets")
    share = dict(zip(fitted["domains"], fitted["max_share"], strict=True))
    region = np.array(
        [int(np.ceil(share.get(name, 0.0) * budget)) for name in inputs.domain_names],
        dtype=np.int64,
    )
    return region if caps is None else np.minimum(region, caps)


def task_objective_weights(stored: StoredSurrogate, section: Any) -> np.ndarray:
    """``w_t / σ_t`` ``[T]``: how much a unit of task t's utility is worth in the objective."""
    model = stored.model
    weights = np.array([section.task_weights.get(name, 1.0) for name in model.task_names])
    sigma = np.where(stored.utility_std > 0, stored.utility_std, 1.0)
    return weights / sigma


def load_curation_data(ctx: StageContext, inputs: SelectInputs) -> CurationData:
    """Task domains, row texts (text corpora) and TRAK's rows, for the curation selectors."""
    from grasp_cli.artifacts.examples import read_tasks
    from grasp_cli.select.dsir import row_text

    layout = ctx.layout
    task_names = inputs.stored.model.task_names
    lookup = {name: code for code, name in enumerate(inputs.domain_names)}
    task_domains = [lookup[name] for name in task_names if name in lookup]
    texts = task_texts = None
    manifest = require(layout, "corpus", ctx.config, force=True, check_config=False)
    is_text = manifest.extra.get("kind") == "tokens"
    vocab = int(manifest.extra.get("vocab_size", BYTE_VOCAB_SIZE))
    pad = manifest.extra.get("pad_id", BYTE_PAD_ID)
    byte_vocab = vocab <= BYTE_VOCAB_SIZE
    texts = RowTexts(layout.corpus, len(inputs.ids), pad, byte_vocab) if is_text else None
    if is_text:
        task_texts = {
            name: [row_text(row, pad, byte_vocab) for row in examples.fields["tokens"]]
            for name, examples in read_tasks(layout.tasks).items()
        }
    sketches = open_sketches(layout.sketches)
    trak_rows = sketches.matrix("trak") if sketches.trak_train is not None else None
    from grasp_cli.retrain.loop import finished_rounds, load_round, round_folder

    rounds = finished_rounds(layout.path("loop"))
    open_rows = (
        load_round(round_folder(layout.path("loop"), rounds[0]), len(inputs.ids))["rows"][0]
        if rounds
        else None
    )
    return CurationData(
        task_domains,
        texts,
        task_texts,
        trak_rows,
        ctx.config.subsets.dirichlet_alpha,
        open_rows,
        lambda: corpus_row_hashes(layout.corpus, len(inputs.ids), is_text),
    )


def corpus_row_hashes(corpus: Path, n: int, is_text: bool) -> np.ndarray:
    """uint64 ``[N]``: ``row_hashes`` of every corpus row (tokens or pixels), streamed."""
    from grasp_cli.artifacts.examples import iter_example_blocks

    content = np.zeros(n, dtype=np.uint64)
    for start, block in iter_example_blocks(corpus, 0, n, 4096):
        rows = block.fields["tokens"] if is_text else block.fields["image"]
        content[start : start + len(rows)] = row_hashes(rows)
    return content


def row_hashes(rows: np.ndarray) -> np.ndarray:
    """uint64 ``[R]``: a 64-bit hash of each row's bytes (equal rows, equal hashes)."""
    rows = np.ascontiguousarray(rows)
    return np.array(
        [
            int.from_bytes(hashlib.blake2b(row.tobytes(), digest_size=8).digest(), "little")
            for row in rows
        ],
        dtype=np.uint64,
    )


def write_selection(folder: Path, inputs: SelectInputs, outputs: SelectOutputs) -> None:
    rows = np.asarray(outputs.selection.indices)
    ids, codes, names = inputs.ids, inputs.codes, inputs.domain_names
    table = pa.table(
        {
            "id": pa.array(ids[rows], pa.int64()),
            "rank": pa.array(np.arange(1, len(rows) + 1), pa.int64()),
            "objective_gain": pa.array(np.asarray(outputs.selection.gains, dtype=np.float64)),
            "domain": pa.array([names[c] for c in codes[rows]], pa.string()),
        }
    )
    write_table(folder / "selected.parquet", table)
    if outputs.curation:  # "whole" is every row: recorded by name in the manifest only
        chosen = {name: rows for name, rows in outputs.curation.items() if name != "whole"}
        write_table(
            folder / "curation.parquet",
            pa.table(
                {
                    "selection": pa.array([n for n, r in chosen.items() for _ in r], pa.string()),
                    "id": pa.array(np.concatenate([ids[r] for r in chosen.values()]), pa.int64()),
                }
            ),
        )


def run_select(ctx: StageContext, export: Path | None = None) -> str:
    layout, section = ctx.layout, ctx.config.select
    if export is not None:  # refuse a bad target before any work (and before touching selection/)
        export_mode(export, layout, ctx.force)
    inputs = load_select_inputs(ctx)
    data = load_curation_data(ctx, inputs) if section.curation else None
    outputs = choose(inputs, section, ctx.config.seed, ctx.progress, data)
    with artifact_dir(layout.selection) as folder:
        write_selection(folder, inputs, outputs)
        write_manifest(
            folder,
            build_manifest(
                layout, "selection", ctx.config, content=folder_digest(folder), extra=outputs.extra
            ),
        )
    selection, budget = outputs.selection, outputs.budget
    message = (
        f"select: {budget} of {len(inputs.ids)} examples by {selection.algorithm} "
        f"({selection.passes} passes, converged={selection.converged}), F = {selection.value:.4g}"
    )
    if export is not None:
        corpus = open_corpus(layout.corpus)
        rows = np.sort(np.asarray(selection.indices))
        mode = write_export(
            export,
            layout,
            (len(rows), corpus.iter_rows(rows, ctx.config.prepare.row_group_rows)),
            force=ctx.force,
            shard_rows=ctx.config.prepare.shard_rows,
            row_group_rows=ctx.config.prepare.row_group_rows,
            provenance={"run": str(layout.root.resolve()), "budget": budget},
        )
        message += f"; exported to {export}" + (
            " (added beside existing files)" if mode == "add" else ""
        )
    return message + f" -> {layout.selection / 'selected.parquet'}"
