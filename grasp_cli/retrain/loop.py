"""The closed loop: measure GRASP's proposal and subsets near it, refit, propose again.

A surrogate is most wrong where nothing was measured, and an optimizer goes exactly there
(the optimizer's curse: the proposal's predicted utility is biased upwards). Each round
measures the current selection and ``loop.subsets`` perturbations of it — swaps of
5 %–``loop.swap`` of its examples, alternately for random corpus rows (a changed mixture) and
for rows of the same domain (the same mixture, other examples) — with the retrain recipe and
the base seed, so they are ordinary fit subsets near the proposal. ``fit-surrogate`` adds every
finished round to its fit subsets (never to the held-out eval subsets: evaluation stays
honest), ``select`` proposes again, and the next ``retrain-subsets --loop`` starts round R+1:

    retrain-subsets --loop  ->  fit-surrogate  ->  select        (R times; each round sharded)

Rounds live in ``RUN/loop/round-RRR/``: ``subsets.npz`` (packed membership ``[m, N/8]``, the
swap fraction and kind of each subset; subset 0 is the proposal), ``proposal.json`` (the
selection that proposed it and what the surrogate predicted for it) and one result part per
subset. ``RUN/loop/_grasp/manifest.json`` lists the finished rounds; its fingerprint changes with each
round, which makes the surrogate stale until it is refit.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from grasp_cli.artifacts.atomic import creation_lock
from grasp_cli.artifacts.examples import open_corpus
from grasp_cli.artifacts.manifest import (
    build_manifest,
    file_digest,
    read_manifest,
    require,
    write_manifest,
)
from grasp_cli.artifacts.subsets import members_of, pack_membership
from grasp_cli.artifacts.tables import read_table
from grasp_cli.context import StageContext
from grasp_cli.errors import InputError

SUBSETS_FILE = "subsets.npz"
PROPOSAL_FILE = "proposal.json"


def round_folder(loop_folder: Path, number: int) -> Path:
    return Path(loop_folder) / f"round-{number:03d}"


def round_numbers(loop_folder: Path) -> list[int]:
    """Rounds that exist (finished or not), in order."""
    if not Path(loop_folder).is_dir():
        return []
    return sorted(
        int(p.name.split("-")[1])
        for p in Path(loop_folder).glob("round-*")
        if p.is_dir() and p.name.split("-")[1].isdigit()
    )


def finished_rounds(loop_folder: Path) -> list[int]:
    return [
        r
        for r in round_numbers(loop_folder)
        if (m := read_manifest(round_folder(loop_folder, r))) is not None and m.complete
    ]


def perturbations(
    proposal: np.ndarray, codes: np.ndarray, count: int, max_swap: float, seed: int
) -> tuple[list[np.ndarray], list[float], list[str]]:
    """``count`` subsets near the proposal (sorted rows ``[B]``), all of size B.

    Subset j swaps ``round(f_j · B)`` members, ``f_j`` evenly from 0.05 to ``max_swap``, for
    non-members drawn uniformly from the corpus (even j: the mixture moves) or from the same
    domain as the member each replaces (odd j: the mixture stays, the examples change).
    Returns (rows, swap fractions, kinds).
    """
    rng = np.random.default_rng(seed)
    n = len(codes)
    proposal = np.asarray(proposal, dtype=np.int64)
    outside = np.setdiff1d(np.arange(n), proposal)
    fractions = np.linspace(0.05, max_swap, count) if count > 1 else np.array([max_swap])
    subsets, kinds = [], []
    for j, fraction in enumerate(fractions):
        swap = min(max(1, int(round(fraction * len(proposal)))), len(outside))
        leaving = rng.choice(len(proposal), size=swap, replace=False)
        kept = np.delete(proposal, leaving)
        if j % 2 == 0:
            entering = rng.choice(outside, size=swap, replace=False)
            kinds.append("swap-any")
        else:
            entering = []
            taken: set[int] = set()
            for row in proposal[leaving]:
                pool = outside[(codes[outside] == codes[row])]
                pool = pool[~np.isin(pool, list(taken))] if taken else pool
                if len(pool) == 0:  # the domain is used up: any row
                    pool = outside[~np.isin(outside, list(taken))]
                pick = int(rng.choice(pool))
                taken.add(pick)
                entering.append(pick)
            entering = np.asarray(entering, dtype=np.int64)
            kinds.append("swap-domain")
        subsets.append(np.sort(np.concatenate([kept, entering])))
    return subsets, [float(f) for f in fractions], kinds


def _proposed_by(loop_folder: Path, number: int) -> str | None:
    """The fingerprint of the selection that proposed round ``number``."""
    path = round_folder(loop_folder, number) / PROPOSAL_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("selection")
    except (OSError, ValueError):
        return None


def load_round(folder: Path, n_rows: int) -> dict[str, Any]:
    """A round's subsets (rows per subset), kinds, swap fractions and proposal record."""
    with np.load(folder / SUBSETS_FILE, allow_pickle=False) as data:
        membership = data["membership"]
        kinds = [str(k) for k in data["kinds"]]
        fractions = data["fractions"].tolist()
    proposal = json.loads((folder / PROPOSAL_FILE).read_text(encoding="utf-8"))
    return {
        "membership": membership,
        "rows": [members_of(m, n_rows) for m in membership],
        "kinds": kinds,
        "fractions": fractions,
        "proposal": proposal,
    }


def run_loop(ctx: StageContext, limit: int | None = None) -> str:
    """Start (or continue) the next round of the closed loop from the current selection."""
    from grasp_cli.retrain.stage import Job, train_jobs

    layout, config = ctx.layout, ctx.config
    selection = require(layout, "selection", config, force=ctx.force)
    surrogate = require(layout, "surrogate", config, force=ctx.force)
    loop_folder = layout.path("loop")
    done = finished_rounds(loop_folder)
    existing = round_numbers(loop_folder)
    pending = [r for r in existing if r not in done]
    used = list(surrogate.extra.get("loop_rounds", []))
    if not pending and done and _proposed_by(loop_folder, done[-1]) == selection.fingerprint:
        write_loop_manifest(ctx, loop_folder, done)  # another shard may have finished it
        return (
            f"loop round {done[-1]}: complete (the current selection's round); "
            "run `grasp fit-surrogate` and `grasp select` for the next"
        )
    if pending:
        number = pending[0]
    elif used != done:
        raise InputError(
            f"{loop_folder}: round {done[-1]} is measured but the surrogate was fitted on rounds "
            f"{used or 'none'}; run `grasp fit-surrogate` and `grasp select` first"
        )
    elif selection.inputs.get("surrogate") != surrogate.fingerprint:
        raise InputError(
            f"{layout.selection} was made from an older surrogate; run `grasp select` first"
        )
    else:
        number = (done[-1] if done else 0) + 1
    folder = round_folder(loop_folder, number)
    corpus = open_corpus(layout.corpus)
    codes, _ = corpus.domain_codes()
    seed = config.seed(f"loop-{number}")

    def skeleton(target: Path) -> None:
        selected = read_table(layout.selection / "selected.parquet").column("id").to_numpy()
        rows, known = corpus.positions(selected)
        if not known.all():
            raise InputError(
                f"{layout.selection / 'selected.parquet'}: ids not in {layout.corpus}; "
                "rerun `grasp select`"
            )
        proposal = np.sort(rows)
        near, fractions, kinds = perturbations(
            proposal, codes, config.loop.subsets, config.loop.swap, seed
        )
        masks = np.zeros((1 + len(near), len(corpus)), dtype=bool)
        for j, rows in enumerate([proposal, *near]):
            masks[j, rows] = True
        np.savez(
            target / SUBSETS_FILE,
            membership=pack_membership(masks),
            kinds=np.array(["proposal", *kinds]),
            fractions=np.array([0.0, *fractions]),
        )
        record = {
            "round": number,
            "selection": selection.fingerprint,
            "surrogate": surrogate.fingerprint,
            "predicted_utilities": selection.extra.get("predicted_utilities"),
            "objective": selection.extra.get("objective"),
        }
        (target / PROPOSAL_FILE).write_text(json.dumps(record, indent=2), encoding="utf-8")
        return None

    if not folder.exists():
        folder.parent.mkdir(parents=True, exist_ok=True)
    count = 1 + config.loop.subsets
    base = config.seed("retrain")
    jobs = [Job(j, base, "loop") for j in range(count)]
    rows_cache: dict[int, np.ndarray] = {}

    def rows_of(job: Job) -> np.ndarray:
        if not rows_cache:
            rows_cache.update(enumerate(load_round(folder, len(corpus))["rows"]))
        return rows_cache[job.subset_id]

    message = train_jobs(
        ctx,
        "loop",
        jobs,
        rows_of,
        corpus,
        limit,
        folder=folder,
        skeleton=skeleton,
        extra={"round": number, "seed": seed},
    )
    finished = finished_rounds(loop_folder)
    if number in finished:
        write_loop_manifest(ctx, loop_folder, finished)
    return f"loop round {number}: " + message


def write_loop_manifest(ctx: StageContext, loop_folder: Path, rounds: list[int]) -> None:
    """``RUN/loop/_grasp/manifest.json``: the finished rounds; its fingerprint changes with each one."""
    fingerprints = [read_manifest(round_folder(loop_folder, r)).fingerprint for r in rounds]
    files = [round_folder(loop_folder, r) / SUBSETS_FILE for r in rounds]
    with creation_lock(loop_folder):
        manifest = build_manifest(
            ctx.layout,
            "loop",
            ctx.config,
            content=hashlib.sha256(
                (":".join(fingerprints) + file_digest(files)).encode()
            ).hexdigest()[:20],
            extra={"rounds": rounds},
        )
        write_manifest(loop_folder, manifest)
