"""The ``cytosyn`` command: one verb per pipeline stage.

Every verb takes ``--config FILE.yaml`` plus dotted overrides (``grid.mpp=0.25``); the whole config is
validated before any work starts, and the resolved config is written next to the outputs.

Exit codes: 0 success, 1 bad config or input, 3 some items failed (the rest is done and kept),
4 the output location is unusable (the run stopped).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from cytosyn.config import ConfigError, load_config
from cytosyn.fileio import is_storage_error
from cytosyn.logs import setup_logging
from cytosyn.parts import part_record

EXIT_OK, EXIT_ERROR, EXIT_PARTIAL, EXIT_OUTPUT = 0, 1, 3, 4


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="YAML config file (defaults apply without one)")
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. grid.mpp=0.25"
    )


def _overrides(args: argparse.Namespace, flags: dict[str, str]) -> list[str]:
    """The dotted overrides plus one ``key=value`` per shorthand flag given (flag attribute → config key)."""
    extra = [f"{key}={getattr(args, flag)}" for flag, key in flags.items() if getattr(args, flag) is not None]
    return [*args.overrides, *extra]


def _cmd_tile(args: argparse.Namespace) -> int:
    from cytosyn.data_prep.tile_config import TileConfig
    from cytosyn.data_prep.tiler import OutputError, run_tiling

    overrides = _overrides(args, {"output": "output", "workers": "run.workers", "part": "run.part"})
    if args.input:
        overrides.append(f"slides.input=[{','.join(repr(str(p)) for p in args.input)}]")
    cfg = load_config(TileConfig, args.config, overrides)
    if not cfg.slides.input:
        raise ConfigError("no slides given: set slides.input in the config or pass --input")
    with part_record(cfg.output, "tile", cfg.run.part) as record:
        try:
            summary = run_tiling(cfg)
        except OutputError as err:
            logging.getLogger("cytosyn").error("%s", err)
            record.update(status="failed", error_type="OutputError", error=str(err))
            return EXIT_OUTPUT
        record.update(**summary.as_dict())
    print(summary.report())
    return EXIT_PARTIAL if summary.failed else EXIT_OK


def _cmd_ingest(args: argparse.Namespace) -> int:
    from cytosyn.data_prep.ingest import run_ingest
    from cytosyn.data_prep.ingest_config import IngestConfig

    overrides = _overrides(args, {"output": "output"})
    if args.folders:
        overrides.append(f"inputs.folders=[{','.join(repr(str(p)) for p in args.folders)}]")
    if args.csv:
        overrides.append(f"inputs.csv=[{','.join(repr(str(p)) for p in args.csv)}]")
    summary = run_ingest(load_config(IngestConfig, args.config, overrides))
    print(summary.report())
    return EXIT_OK


def _cmd_pack(args: argparse.Namespace) -> int:
    from cytosyn.data_prep.pack import run_pack
    from cytosyn.data_prep.pack_config import PackConfig
    from cytosyn.data_prep.verify import verify_dataset

    if args.verify is not None:
        report = verify_dataset(args.verify)
        print(report.report())
        return EXIT_OK if report.ok else EXIT_ERROR
    overrides = _overrides(args, {"output": "output"})
    cfg = load_config(PackConfig, args.config, overrides)
    summary = run_pack(cfg)
    print(summary.report())
    return EXIT_PARTIAL if summary.excluded else EXIT_OK


def _cmd_featurize(args: argparse.Namespace) -> int:
    from cytosyn.data_prep.featurize import FeaturizeError, run_featurize
    from cytosyn.data_prep.featurize_config import FeaturizeConfig

    overrides = _overrides(args, {"input": "input", "output": "output", "part": "part"})
    cfg = load_config(FeaturizeConfig, args.config, overrides)
    with part_record(cfg.output, "featurize", cfg.part) as record:
        try:
            summary = run_featurize(cfg)
        except FeaturizeError as err:
            print(f"cytosyn featurize: {err}", file=sys.stderr)
            record.update(status="failed", error_type="FeaturizeError", error=str(err))
            return EXIT_ERROR
        record.update(**asdict(summary))
    print(summary.report())
    return EXIT_OK


def _cmd_train(args: argparse.Namespace) -> int:
    from cytosyn.training.config import TrainConfig
    from cytosyn.training.module import TrainingDataError
    from cytosyn.training.run import (
        EXIT_REQUEUE,
        CheckpointWriteError,
        NoIntactCheckpointError,
        run_training,
    )

    cfg = load_config(TrainConfig, args.config, args.overrides)
    try:
        result = run_training(cfg, force=args.force, restart=args.restart)
    except (TrainingDataError, NoIntactCheckpointError, CheckpointWriteError) as err:
        print(f"cytosyn train: {err}", file=sys.stderr)
        return EXIT_ERROR
    print(
        f"train {result.status}: step {result.global_step}, {result.images_seen} images seen, "
        f"{result.skipped_steps} skipped steps; run folder {cfg.run_dir}"
    )
    return EXIT_REQUEUE if result.status == "preempted" else EXIT_OK


def _cmd_finetune(args: argparse.Namespace) -> int:
    from cytosyn.training.fewshot import FewShotError
    from cytosyn.training.finetune import FinetuneConfig, run_finetune
    from cytosyn.training.module import TrainingDataError
    from cytosyn.training.run import EXIT_REQUEUE

    overrides = _overrides(args, {"base": "base", "data": "data.train", "run_dir": "run_dir"})
    cfg = load_config(FinetuneConfig, args.config, overrides)
    try:
        result = run_finetune(cfg, force=args.force)
    except (TrainingDataError, FewShotError) as err:
        print(f"cytosyn finetune: {err}", file=sys.stderr)
        return EXIT_ERROR
    t = result.train
    print(
        f"finetune {t.status}: step {t.global_step}, {result.few_shot['tiles']} few-shot tiles of "
        f"{len(result.few_shot['label_names'])} classes; adapter {result.adapter or 'not written (unfinished)'}"
    )
    return EXIT_REQUEUE if t.status == "preempted" else EXIT_OK


def _cmd_tune_vae(args: argparse.Namespace) -> int:
    from cytosyn.models.lpips import LPIPSWeightsError
    from cytosyn.models.vae import VAEError
    from cytosyn.training.vae_tuning import TuneVAEConfig, VAETuneError, run_vae_tuning

    overrides = _overrides(args, {"mode": "mode", "data": "data.train", "run_dir": "run_dir"})
    cfg = load_config(TuneVAEConfig, args.config, overrides)
    try:
        result = run_vae_tuning(cfg, force=args.force)
    except (VAETuneError, VAEError, LPIPSWeightsError) as err:
        print(f"cytosyn tune-vae: {err}", file=sys.stderr)
        return EXIT_ERROR
    r = result.report
    gain = (
        f"held-out PSNR {r['before']['psnr_db']:.2f} → {r['after']['psnr_db']:.2f} dB" if r["after"] else ""
    )
    print(f"tune-vae ({cfg.mode}): {result.steps} steps ({result.skipped} skipped); {gain}")
    print(f"tuned VAE → {result.export} ({result.descriptor['weights']})")
    print(f"featurize with: vae.name={result.descriptor['base']} vae.weights={result.export}")
    return EXIT_OK


def _cmd_sample(args: argparse.Namespace) -> int:
    from cytosyn.pipeline import PipelineError
    from cytosyn.sample import SampleConfig, SampleError, run_sample

    overrides = _overrides(args, {"model": "model", "split": "split", "output": "output", "part": "part"})
    cfg = load_config(SampleConfig, args.config, overrides)
    with part_record(cfg.output, "sample", cfg.part) as record:
        try:
            summary = run_sample(cfg)
        except (SampleError, PipelineError) as err:
            print(f"cytosyn sample: {err}", file=sys.stderr)
            record.update(status="failed", error_type=type(err).__name__, error=str(err))
            return EXIT_ERROR
        record.update(shards_done=summary.done, shards_skipped=summary.skipped, images=summary.images)
    print(summary.report())
    return EXIT_OK


def _cmd_release(args: argparse.Namespace) -> int:
    from cytosyn.pipeline import PipelineError
    from cytosyn.release import ReleaseConfig, run_release_config

    overrides = _overrides(
        args, {"checkpoint": "checkpoint", "output": "output", "eval_report": "eval_report"}
    )
    if args.overwrite:
        overrides.append("overwrite=true")
    cfg = load_config(ReleaseConfig, args.config, overrides)
    try:
        summary = run_release_config(cfg)
    except PipelineError as err:
        print(f"cytosyn release: {err}", file=sys.stderr)
        return EXIT_ERROR
    print(summary.report())
    return EXIT_OK


def _cmd_eval(args: argparse.Namespace) -> int:
    from cytosyn.eval.run import EvalConfig, run_eval

    overrides = _overrides(args, {"output": "output"})
    cfg = load_config(EvalConfig, args.config, overrides)
    out = run_eval(cfg)
    print(
        f"eval report: {out / 'report.html'} (markdown {out / 'report.md'}, numbers {out / 'metrics.json'})"
    )
    return EXIT_OK


def _cmd_launch(args: argparse.Namespace) -> int:
    """Training job (``cytosyn launch --config train.yaml``) or a data stage's array
    (``cytosyn launch tile|featurize|sample --config X.yaml --parts N``)."""
    from cytosyn.launch.arrays import STAGES, cmd_array
    from cytosyn.launch.launch import cmd_launch

    if args.stage is not None:
        return cmd_array(args, args.stage, args.overrides)
    if (
        args.overrides and args.overrides[0] in STAGES
    ):  # a stage after the options: cytosyn launch --parts 2 tile
        return cmd_array(args, args.overrides[0], args.overrides[1:])
    if args.parts is not None or args.submit or args.max_concurrent is not None:
        raise ConfigError(f"--parts/--submit/--max-concurrent are for the data stages ({', '.join(STAGES)})")
    return cmd_launch(args)


def _cmd_status(args: argparse.Namespace) -> int:
    from cytosyn.launch.array_status import folder_stage, status_text
    from cytosyn.launch.launch import cmd_status

    if args.run_dir.is_dir() and folder_stage(args.run_dir) is not None:
        print(status_text(args.run_dir))
        return EXIT_OK
    return cmd_status(args)


def _cmd_score(args: argparse.Namespace) -> int:
    from cytosyn.pipeline import PipelineError
    from cytosyn.scoring.run import ScoreConfig, run_score

    overrides = _overrides(args, {"model": "model", "input": "input", "output": "output", "part": "part"})
    cfg = load_config(ScoreConfig, args.config, overrides)
    try:
        summary = run_score(cfg)
    except PipelineError as err:
        print(f"cytosyn score: {err}", file=sys.stderr)
        return EXIT_ERROR
    print(summary.report())
    return EXIT_OK


def _cmd_demo(args: argparse.Namespace) -> int:
    from cytosyn.demo import DEFAULT_TRAIN_STEPS, run_demo

    steps = args.train_steps if args.train_steps is not None else DEFAULT_TRAIN_STEPS
    return run_demo(args.output, workers=args.workers, train_steps=steps)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cytosyn", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action=_VersionAction, help="the code version (git describe) and exit")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    tile = verbs.add_parser("tile", help="whole-slide images → per-slide webdataset tile shards")
    _add_config_args(tile)
    tile.add_argument("--input", nargs="+", type=Path, help="slide files, folders or .txt lists")
    tile.add_argument("--output", type=Path, help="output folder (shorthand for output=...)")
    tile.add_argument("--workers", type=int, help="worker processes (run.workers)")
    tile.add_argument("--part", help="i/N: take every N-th slide starting at i (SLURM arrays)")
    tile.set_defaults(func=_cmd_tile)

    ingest = verbs.add_parser(
        "ingest", help="tile datasets (class folders or a CSV) → tile shards with labels"
    )
    _add_config_args(ingest)
    ingest.add_argument("--folders", nargs="+", type=Path, help="class folders: <folder>/<label>/<image>")
    ingest.add_argument("--csv", nargs="+", type=Path, help="CSV: path,label,patient_id,slide_id,site,mpp")
    ingest.add_argument("--output", type=Path, help="output folder (shorthand for output=...)")
    ingest.set_defaults(func=_cmd_ingest)

    pack = verbs.add_parser("pack", help="per-slide shards → patient-level split datasets with manifests")
    _add_config_args(pack)
    pack.add_argument("--output", type=Path, help="dataset folder (shorthand for output=...)")
    pack.add_argument(
        "--verify", type=Path, metavar="DATASET", help="verify a packed dataset instead of packing"
    )
    pack.set_defaults(func=_cmd_pack)

    feat = verbs.add_parser("featurize", help="add encoder embeddings and VAE latents to a packed split")
    _add_config_args(feat)
    feat.add_argument("--input", type=Path, help="packed split folder (has manifest.json)")
    feat.add_argument("--output", type=Path, help="featurized split folder")
    feat.add_argument("--part", help="i/N: take every N-th shard from i (one process per GPU)")
    feat.set_defaults(func=_cmd_featurize)

    train = verbs.add_parser("train", help="train (or resume) a SiT latent-diffusion model")
    _add_config_args(train)
    train.add_argument(
        "--force", action="store_true", help="resume even if the config differs from the run's"
    )
    train.add_argument(
        "--restart",
        action="store_true",
        help="when every checkpoint of the run is damaged, move them aside and start again from step 0",
    )
    train.set_defaults(func=_cmd_train)

    finetune = verbs.add_parser(
        "finetune", help="few-shot LoRA / class-label fine-tune of a release → adapter folder"
    )
    _add_config_args(finetune)
    finetune.add_argument("--base", type=Path, help="base release folder or checkpoint (base=...)")
    finetune.add_argument("--data", type=Path, help="labelled featurized split (data.train=...)")
    finetune.add_argument("--run-dir", dest="run_dir", type=Path, help="run folder (run_dir=...)")
    finetune.add_argument(
        "--force", action="store_true", help="resume even if the config differs from the run's"
    )
    finetune.set_defaults(func=_cmd_finetune)

    tune_vae = verbs.add_parser(
        "tune-vae", help="fine-tune an autoencoder on tiles (or REPA-E end to end) → tuned VAE folder"
    )
    _add_config_args(tune_vae)
    tune_vae.add_argument("--mode", choices=["finetune", "e2e"], help="mode=...")
    tune_vae.add_argument("--data", type=Path, help="packed split with images (data.train=...)")
    tune_vae.add_argument("--run-dir", dest="run_dir", type=Path, help="run folder (run_dir=...)")
    tune_vae.add_argument(
        "--force", action="store_true", help="start over in a run folder with other settings"
    )
    tune_vae.set_defaults(func=_cmd_tune_vae)

    sample = verbs.add_parser("sample", help="generate a synthetic tile dataset from a checkpoint or release")
    _add_config_args(sample)
    sample.add_argument(
        "--model", type=Path, help="release folder or training checkpoint / run folder (model=...)"
    )
    sample.add_argument(
        "--split", type=Path, help="featurized split whose embeddings condition the tiles (split=...)"
    )
    sample.add_argument("--output", type=Path, help="output folder (output=...)")
    sample.add_argument("--part", help="i/N: output shards i, i+N, ... (one process per GPU)")
    sample.set_defaults(func=_cmd_sample)

    release = verbs.add_parser(
        "release", help="training checkpoint → release folder (safetensors, config, card, SHA256SUMS)"
    )
    _add_config_args(release)
    release.add_argument(
        "--checkpoint", type=Path, help=".ckpt file, run folder or DeepSpeed folder (checkpoint=...)"
    )
    release.add_argument("--output", type=Path, help="release folder (output=...)")
    release.add_argument(
        "--eval-report", dest="eval_report", type=Path, help="eval report folder or metrics.json"
    )
    release.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    release.set_defaults(func=_cmd_release)

    ev = verbs.add_parser(
        "eval", help="evaluate a generator (overfitting, domain or sweep study) → report folder"
    )
    _add_config_args(ev)
    ev.add_argument("--output", type=Path, help="report folder (shorthand for output=...)")
    ev.set_defaults(func=_cmd_eval)

    from cytosyn.launch.arrays import add_array_arguments
    from cytosyn.launch.launch import add_launch_arguments

    score = verbs.add_parser(
        "score", help="per-tile denoising errors: generative classification, anomaly and out-of-domain scores"
    )
    _add_config_args(score)
    score.add_argument(
        "--model", type=Path, help="release folder or training checkpoint / run folder (model=...)"
    )
    score.add_argument("--input", type=Path, help="split folder or image folder to score (input=...)")
    score.add_argument("--output", type=Path, help="output folder (output=...)")
    score.add_argument("--part", help="i/N: score input shards i, i+N, ... (one process per GPU)")
    score.set_defaults(func=_cmd_score)

    launch = verbs.add_parser(
        "launch",
        help="render and submit a multi-node training job (SLURM or torchrun), or a SLURM array of "
        "tile / featurize / sample parts (cytosyn launch tile --config tile.yaml --parts 64)",
    )
    add_launch_arguments(launch)
    add_array_arguments(launch)
    launch.set_defaults(func=_cmd_launch)

    status = verbs.add_parser(
        "status",
        help="progress of a training run folder, or of a tiles / features / synthetic folder's parts",
    )
    status.add_argument("run_dir", type=Path)
    status.set_defaults(func=_cmd_status)

    demo = verbs.add_parser("demo", help="a tiny end-to-end run on bundled data")
    demo.add_argument("--output", type=Path, default=Path("demo_out"), help="demo folder (default demo_out)")
    demo.add_argument("--workers", type=int, default=1)
    demo.add_argument("--train-steps", type=int, default=None, help="training steps of the demo model")
    demo.set_defaults(func=_cmd_demo)
    return parser


def _lift_stage(argv: Sequence[str]) -> list[str]:
    """``launch tile --config x.yaml key=v`` → ``launch --config x.yaml key=v --stage tile``: argparse reads
    one run of positionals only, so the stage word cannot share the KEY=VALUE positional list."""
    argv = list(argv)
    verb = next((i for i, a in enumerate(argv) if not a.startswith("-")), None)
    if verb is not None and argv[verb] == "launch" and verb + 1 < len(argv):
        from cytosyn.launch.arrays import STAGES

        if argv[verb + 1] in STAGES:
            return [*argv[: verb + 1], *argv[verb + 2 :], "--stage", argv[verb + 1]]
    return argv


class _VersionAction(argparse.Action):
    """``--version``: computed only when asked (it runs ``git describe``)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        from cytosyn.fileio import code_version

        print(f"cytosyn {code_version()}")
        parser.exit()


_EXIT_WORDS = {
    EXIT_OK: "done",
    EXIT_ERROR: "failed",
    EXIT_PARTIAL: "partly failed",
    EXIT_OUTPUT: "stopped",
    75: "preempted (requeue)",
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(_lift_stage(sys.argv[1:] if argv is None else argv))
    setup_logging(args.verbose)
    start = time.perf_counter()
    try:
        code = args.func(args)
    except ConfigError as err:
        print(f"cytosyn {args.verb}: {err}", file=sys.stderr)
        code = EXIT_ERROR
    except OSError as err:
        if not is_storage_error(err):
            raise
        # Finished work is kept (shards are complete or absent, manifests last): the same command
        # continues once there is room.
        print(f"cytosyn {args.verb}: cannot write the output: {err}", file=sys.stderr)
        code = EXIT_OUTPUT
    except (FileNotFoundError, ValueError) as err:
        print(f"cytosyn {args.verb}: error: {err}", file=sys.stderr)
        code = EXIT_ERROR
    word = _EXIT_WORDS.get(code, "exited")
    logging.getLogger("cytosyn").info(
        "cytosyn %s %s in %.1f s (exit %d)", args.verb, word, time.perf_counter() - start, code
    )
    return code


if __name__ == "__main__":
    sys.exit(main())
