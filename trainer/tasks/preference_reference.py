"""Precomputed reference scores (preference.precompute_reference): the initial model's
summed answer log-probability of each side of every pair, scored in one pass before
training so that training holds one model.

The scores are kept in the tokenization cache, inside the entry of the encoded pairs they
belong to (data/cache.py `derived_entry`), keyed by that entry and by everything else that
decides them: the model section, the weights files, the dtype the weights are in, the
precision, the device type, torch's version, the scoring batch size and how many processes
share the pairs (both move the padding, so the shapes of the matrix products). A later
start, a resume, or another rank of the node reads them instead of scoring again; they are
the same floats either way, so a run trains bitwise alike whether they were read or
computed. With data.cache_dir null they are computed at every start, as they always were.

Where the weights are whole on each process, the initial model scores every pair before
training; under ZeRO-3/FSDP, which shard the weights as they load, the prepared model
does, each process a contiguous share of the pairs (`add_sharded_reference_scores`)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from trainer.logs import get_logger

if TYPE_CHECKING:
    import datasets
    import torch

    from trainer.config import RunConfig
    from trainer.data.prepare import PreparedData
    from trainer.tasks.preference import PairObjective

logger = get_logger(__name__)

# Bump when scoring changes what it produces for the same pairs and model.
SCORES_VERSION = 1
COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")


def reference_scores(
    scorer: PairObjective,
    model: torch.nn.Module,
    device: torch.device,
    pairs: datasets.Dataset,
    rows: range,
    batch_size: int,
    forwards: int = 0,
) -> list[tuple[float, float]]:
    """(chosen, rejected): the reference's summed answer log-probability of each side of
    the pairs `rows`, scored in order in eval mode. `forwards`: at least this many forward
    passes (a sharded forward is a collective, so every process runs as many; the extra
    ones, on the last batch or pair 0, are dropped). The padding id is immaterial: padding
    is masked from attention and from the labels."""
    from accelerate.utils import extract_model_from_parallel

    from trainer import progress
    from trainer.data.collate import PairCollator

    if not len(pairs):
        return []
    inner, collate = extract_model_from_parallel(model), PairCollator(0)
    was_training, kept = inner.training, len(rows)
    inner.eval()
    rows = rows if kept else range(0, 1)  # no share of the pairs: pair 0, dropped
    starts = list(range(rows.start, rows.stop, batch_size))
    starts += [starts[-1]] * (forwards - len(starts))
    scores: list[tuple[float, float]] = []
    for number, start in enumerate(progress.bar(starts, desc="score reference", leave=False)):
        batch = collate([pairs[i] for i in range(start, min(start + batch_size, rows.stop))])
        logps = scorer.reference_logps(model, {k: v.to(device) for k, v in batch.items()})
        half = len(logps) // 2
        if number * batch_size < kept:
            scores += zip(logps[:half].tolist(), logps[half:].tolist(), strict=True)
    inner.train(was_training)
    return scores


def _as_columns(scores: list[tuple[float, float]]) -> datasets.Dataset:
    import datasets

    features = datasets.Features({name: datasets.Value("float64") for name in COLUMNS})
    chosen, rejected = [s[0] for s in scores], [s[1] for s in scores]
    return datasets.Dataset.from_dict({COLUMNS[0]: chosen, COLUMNS[1]: rejected}, features)


def weights_identity(cfg: RunConfig) -> object:
    """What decides the initial weights: the SHA-256 of each file of the model's folder
    (a local one, or the hub snapshot transformers loaded; memoised per node, so a later
    start costs no reread), or with model.from_scratch the seed that drew them."""
    from trainer.data import cache

    if cfg.model.from_scratch:
        return {"from_scratch_seed": cfg.train.seed}
    folder = Path(cfg.model.name_or_path).expanduser()
    if not folder.is_dir():  # a hub id: the files it was loaded from, in the hub's cache
        from huggingface_hub import snapshot_download

        name, revision = cfg.model.name_or_path, cfg.model.revision
        folder = Path(snapshot_download(name, revision=revision, local_files_only=True))
    return [[p.name, cache.file_digest(p)] for p in sorted(folder.iterdir()) if p.is_file()]


def scores_key(
    cfg: RunConfig, model: torch.nn.Module, device: torch.device, shares: int = 1
) -> dict:
    """Everything besides the encoded pairs (the entry's own key) that decides the scores.
    `shares`: the processes that split the pairs between them (sharded weights), which
    moves the batches' boundaries and so their padding."""
    import dataclasses

    import torch

    return {
        "version": SCORES_VERSION,
        "model": dataclasses.asdict(cfg.model),  # overrides, attention, tokenizer, revision
        "weights": weights_identity(cfg),
        "dtype": str(next(model.parameters()).dtype),
        "precision": cfg.train.precision,
        "device": device.type,
        "torch": torch.__version__,
        "batch_size": cfg.eval.batch_size,
        "shares": shares,
    }


def _splits(data: PreparedData) -> dict[str, datasets.Dataset]:
    """The encoded splits by their cache entry's names."""
    named = {f"train-{i}": split for i, split in enumerate(data.train)}
    if data.validation is not None:
        named["validation"] = data.validation
    return named


def _attach(data: PreparedData, scores: dict[str, datasets.Dataset], status: str) -> None:
    """Put each split's scores next to its pairs as COLUMNS (the collator batches them as
    `ref_logps`), record where they came from in data.cache (run_summary.json) and say it."""
    import datasets

    named = _splits(data)
    joined = {n: datasets.concatenate_datasets([named[n], scores[n]], axis=1) for n in named}
    data.train = [joined[f"train-{i}"] for i in range(len(data.train))]
    data.validation = joined.get("validation")
    data.cache["reference_scores"] = status
    said = {"hit": "read from the data cache", "built": "computed and stored in the data cache"}
    logger.info(
        "reference log-probabilities of %d pairs: %s",
        sum(len(split) for split in named.values()),
        said.get(status, "computed (data.cache_dir is null)"),
    )


def add_reference_scores(
    cfg: RunConfig, scorer: PairObjective, device: torch.device, data: PreparedData
) -> None:
    """Before training, with the initial model whole on this process: each pair's reference
    scores, read from the cache when it holds them, else scored and (with a cache) stored
    there, one process of a node scoring while the others wait and read."""
    from trainer.data import cache

    folder, batch = data.cache.get("folder"), cfg.eval.batch_size
    key = None if folder is None else scores_key(cfg, scorer.reference, device)

    def score() -> cache.Entry:
        splits = {
            name: _as_columns(
                reference_scores(scorer, scorer.reference, device, split, range(len(split)), batch)
            )
            for name, split in _splits(data).items()
        }
        return cache.Entry(splits, {"reference": key})

    if folder is None:
        _attach(data, score().splits, "off")
        return
    entry, cached = cache.derived_entry(Path(folder), "reference", key, score)
    _attach(data, entry.splits, "hit" if cached else "built")


def add_sharded_reference_scores(
    cfg: RunConfig, scorer: PairObjective, model, accelerator, data: PreparedData
) -> None:
    """Under ZeRO-3/FSDP, once the model is prepared (its weights are sharded from loading
    on, so only the prepared model runs them): the scores make_objective left out, read
    from the cache when every process finds them there, else scored by all processes
    together, each a contiguous share in as many forward passes, gathered in order, and
    stored by each node's first process."""
    import math

    from accelerate.utils import extract_model_from_parallel, gather_object

    from trainer.data import cache

    folder, device = data.cache.get("folder"), accelerator.device
    inner, world = extract_model_from_parallel(model), accelerator.num_processes
    key = scores_key(cfg, inner, device, world) if folder else None
    derived = cache.derived_folder(Path(folder), "reference", key) if folder else None
    if derived is not None and all(gather_object([cache.is_cached(derived)])):
        _attach(data, cache.load_entry(derived).splits, "hit")
        return
    rank, batch = accelerator.process_index, cfg.eval.batch_size
    splits = {}
    for name, split in _splits(data).items():
        share = math.ceil(len(split) / world)
        rows = range(min(rank * share, len(split)), min((rank + 1) * share, len(split)))
        mine = reference_scores(scorer, model, device, split, rows, batch, math.ceil(share / batch))
        splits[name] = _as_columns(gather_object(mine))
    if derived is not None and accelerator.is_local_main_process:
        entry = cache.Entry(splits, {"reference": key})
        cache.derived_entry(Path(folder), "reference", key, lambda: entry)
    _attach(data, splits, "off" if derived is None else "built")
