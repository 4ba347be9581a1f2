"""The ``tlb-rl`` command: train, evaluate, inspect the memory, record demonstrations, run studies, list envs.

Mistakes the user can fix print one line on stderr and exit with status 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tlb_rl.errors import TrainingError, UserError

if TYPE_CHECKING:  # agents/ is imported where a command needs it, so `tlb-rl --help` starts fast
    from agents.base import Agent


def _train(args: argparse.Namespace) -> None:
    from agents import get_algorithm
    from tlb_rl.checkpoint import load_checkpoint
    from tlb_rl.config import apply_overrides, from_dict, load_yaml
    from tlb_rl.plots import plot_learning_curve

    if args.resume:
        run_dir = Path(args.resume)
        latest = run_dir / "checkpoints" / "latest.pt"
        data = load_checkpoint(latest)
        cls = get_algorithm(data.get("algo", "?"))
        if not cls.resumable:
            raise UserError(f"{cls.algo} runs cannot be resumed exactly; start a new run (init_from={latest})")
        saved = data["config"]
        # Overrides are merged into the saved config, nested keys included (env_kwargs.x=1 keeps the rest).
        merged = apply_overrides(saved, args.overrides)
        changed = {k: v for k, v in merged.items() if saved.get(k) != v}
        model = cls.load(latest, run_dir=str(run_dir), **changed)
        print(f"resuming {run_dir} at {model.frames} frames", file=sys.stderr)
    else:
        cls = get_algorithm(args.algo)
        values = apply_overrides(load_yaml(args.config) if args.config else {}, args.overrides)
        config = from_dict(cls.config_class, values, cls.algo.upper())
        if config.run_dir is None:
            name = Path(args.config).stem if args.config else cls.algo
            stamp = time.strftime("%Y%m%d-%H%M%S")
            config.run_dir = str(Path("runs") / f"{name}-{config.core}-s{config.seed}-{stamp}")
        model = cls.from_config(config)
    model.prepare()  # e.g. BC's dataset: a bad one stops here, before a run directory is announced
    run_dir = model.run_dir
    assert run_dir is not None
    model.make_run_dir()  # before anything is printed, so a bad directory is the one line the user sees
    print(f"run directory: {run_dir}  (tensorboard --logdir {run_dir / 'tb'})", file=sys.stderr)
    try:
        model.learn(progress=not args.no_progress)
    except KeyboardInterrupt:
        # learn() saved after the update a first Ctrl-C let finish; a second one leaves the last periodic save.
        latest = run_dir / "checkpoints" / "latest.pt"
        if not latest.exists():
            print("\ninterrupted before the first checkpoint; nothing to resume", file=sys.stderr)
        elif model.resumable:
            frames = load_checkpoint(latest)["progress"]["frames"]
            print(
                f"\ninterrupted; the checkpoint holds {frames} frames. Resume with: tlb-rl train --resume {run_dir}",
                file=sys.stderr,
            )
        else:
            print(f"\ninterrupted; the latest state is in {latest}", file=sys.stderr)
        sys.exit(130)
    finally:
        model.close()
    result = model.finish(gif=args.gif)
    print(
        f"final evaluation on {result['episodes']} held-out episodes: success {result['success_rate']:.3f}, "
        f"return {result['mean_return']:.3f}  ({run_dir / 'final_eval.json'})"
    )
    print(f"learning curve: {plot_learning_curve(run_dir)}")


def _find_checkpoint(path: str, which: str) -> Path:
    """A checkpoint file given itself or a run directory (``which``: best, falling back to latest, or latest)."""
    run_dir = Path(path)
    if run_dir.is_file():
        return run_dir
    ckpt = run_dir / "checkpoints" / f"{which}.pt"
    if which == "best" and not ckpt.exists():
        ckpt = run_dir / "checkpoints" / "latest.pt"  # no evaluation ran during training
    if not ckpt.exists():
        raise UserError(f"no checkpoint at {ckpt}: is {run_dir} a run directory of a run that saved one?")
    return ckpt


def _load_any(ckpt: Path) -> Agent:
    from agents import load_model

    # device: a run trained on a GPU evaluates on a machine without one; eager: compiling would cost more than it
    # saves over an evaluation
    return load_model(ckpt, device="auto", compile=False, cuda_graphs=False)


def _with_env(model: Agent, overrides: list[str]) -> Agent:
    """``model`` set to play another env or other env options (``env=ID``, ``env_kwargs.KEY=VALUE``)."""
    from tlb_rl.config import apply_overrides

    if not overrides:
        return model
    values = apply_overrides({"env": model.env_spec, "env_kwargs": model.config.env_kwargs}, overrides)
    unknown = sorted(set(values) - {"env", "env_kwargs"})
    if unknown:
        raise UserError(f"only the env can be overridden here (env=ID, env_kwargs.KEY=VALUE), not {', '.join(unknown)}")
    if not isinstance(values["env_kwargs"], dict):
        raise UserError(f"env_kwargs must be a mapping, got {values['env_kwargs']!r}")
    model.set_env(values["env"], values["env_kwargs"])
    return model


def _env_overrides(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="play another env, or the run's with other options (after the run): env=ID, env_kwargs.KEY=VALUE",
    )


def _eval(args: argparse.Namespace) -> None:
    model = _with_env(_load_any(_find_checkpoint(args.run_dir, args.checkpoint)), args.overrides)
    # Without --deterministic each algorithm keeps its default (BC: greedy, like the bot it copies).
    result = model.evaluate(args.episodes, gif_path=args.gif, deterministic=True if args.deterministic else None)
    summary = {k: result[k] for k in ("episodes", "success_rate", "mean_return", "mean_length")}
    print(json.dumps(summary))


def _export(args: argparse.Namespace) -> None:
    model = _load_any(_find_checkpoint(args.run_dir, args.checkpoint))
    model.save(args.out, weights_only=True)
    print(f"{args.out}: {Path(args.out).stat().st_size:,} bytes (config, spaces, policy weights)")


def _inspect(args: argparse.Namespace) -> None:
    import numpy as np

    from agents.inspect import PROBE_PENALTY, chunk_split, linear_probe
    from agents.inspect_figures import episode_figure, episode_gif, pca_figure, probe_figure

    checkpoint = _find_checkpoint(args.path, args.checkpoint)
    model = _with_env(_load_any(checkpoint), args.overrides)
    target = Path(args.path)
    out = Path(args.out) if args.out else target / "inspect" if target.is_dir() else Path(f"inspect-{target.stem}")
    render = args.gif and model.renders_frames()
    deterministic = True if args.deterministic else None
    episodes = model.inspect(args.episodes, args.probe, deterministic=deterministic, render=render)
    out.mkdir(parents=True, exist_ok=True)
    figures = [episode_figure(e, out / f"episode_seed{e.seed}.png") for e in episodes[: args.figures]]
    figures.append(pca_figure(episodes, out / "pca.png"))
    summary: dict[str, Any] = {
        "checkpoint": str(checkpoint),
        "episodes": len(episodes),
        "success_rate": float(np.mean([e.success for e in episodes])),
        "mean_length": float(np.mean([len(e.memory) for e in episodes])),
        "memory_size": int(episodes[0].memory.shape[1]),
        "mean_change_per_step": float(np.mean(np.concatenate([e.change for e in episodes]))),
    }
    split = chunk_split(episodes)
    if split is not None:
        summary["chunks"] = split
        rates = {k: "n/a" if v["success_rate"] is None else f"{v['success_rate']:.2f}" for k, v in split.items()}
        print(
            f"success {rates['inside_one_chunk']} in the {split['inside_one_chunk']['episodes']} episodes inside one "
            f"chunk, {rates['across_chunks']} in the {split['across_chunks']['episodes']} across a chunk boundary "
            "(there the slow vectors carry what the episode's later steps need)"
        )
    if args.probe:
        probe = linear_probe(episodes, PROBE_PENALTY if args.probe_penalty is None else args.probe_penalty)
        summary["probe"] = {"key": args.probe, **probe}
        figures.append(probe_figure(probe, args.probe, out / "probe.png"))
        last = "n/a (too few episodes or one label)" if probe["last"] is None else f"{probe['last']:.2f}"
        print(f"linear probe of {args.probe!r}: held-out R^2 {last} at the last step (0: chance, 1: read perfectly)")
    if render:
        figures.append(episode_gif(episodes[0], out / "episode.gif"))
    elif args.gif:
        print("no GIF: the env does not render rgb_array frames")
    (out / "inspect.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"{len(episodes)} episodes, success {summary['success_rate']:.2f}; figures: {', '.join(map(str, figures))}")


def _demos(args: argparse.Namespace) -> None:
    from agents.demos import generate_demos

    data = generate_demos(
        args.env,
        args.episodes,
        args.out,
        workers=args.workers,
        seed=args.seed,
        expert=args.expert,
        progress=not args.no_progress,
    )
    h = data.header
    print(
        f"kept {h['episodes']} of {args.episodes} episodes ({len(h['failed_seeds'])} failed"
        + (f": {'; '.join(h['failure_reasons'])}" if h["failed_seeds"] else "")
        + f"), {h['steps']} steps, in {args.out}"
    )


def _envs(args: argparse.Namespace) -> None:
    from envs import describe_envs

    print(describe_envs())


def _compare(args: argparse.Namespace) -> None:
    from commands.study.compare import compare

    compare(
        args.config,
        backend=args.backend,
        workers=args.workers,
        address=args.address,
        out=args.out,
        overrides=args.overrides,
    )


def _report(args: argparse.Namespace) -> None:
    from commands.study.compare import report

    report(args.study_dir)


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
    return value


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tlb-rl", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train an agent: PPO (default) or BC, TLB core by default")
    p.add_argument("--algo", default="ppo", help="a name in agents.ALGORITHMS: ppo (default), bc ...")
    p.add_argument("--config", help="YAML config (configs/<algo>/*.yaml); keys are the algorithm's config fields")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its latest checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-gif", dest="gif", action="store_false", help="skip the GIF of an evaluation episode")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="override config keys, e.g. core=lstm")
    p.set_defaults(func=_train)

    p = sub.add_parser("eval", help="evaluate a run's checkpoint on held-out env seeds")
    p.add_argument("run_dir", help="a run directory (or a checkpoint file)")
    p.add_argument("--episodes", type=_positive_int, default=100, help="episodes (default 100)")
    p.add_argument("--checkpoint", default="best", choices=["best", "latest"], help="which (default best)")
    p.add_argument("--gif", help="write a GIF of the first episode here")
    p.add_argument("--deterministic", action="store_true", help="take the most likely action")
    _env_overrides(p)
    p.set_defaults(func=_eval)

    p = sub.add_parser("export", help="write a run's policy as a small weights-only file to share or ship")
    p.add_argument("run_dir", help="a run directory (or a checkpoint file)")
    p.add_argument("out", help="the file to write")
    p.add_argument("--checkpoint", default="best", choices=["best", "latest"], help="which (default best)")
    p.set_defaults(func=_export)

    p = sub.add_parser("inspect", help="run episodes of a policy and draw what its memory holds and does")
    p.add_argument("path", help="a run directory or a checkpoint file (pretrained/*.pt too)")
    p.add_argument("--episodes", type=_positive_int, default=32, help="held-out episodes (default 32)")
    p.add_argument("--probe", help="a key of the env's info to probe the memory for, e.g. cue on the T-maze")
    p.add_argument(
        "--probe-penalty",
        type=_positive_float,
        help="the probe's ridge penalty, in units of the memory's total variance (default 1; agents/inspect.py)",
    )
    p.add_argument("--figures", type=_count, default=4, help="episodes drawn one PNG each (default 4)")
    p.add_argument("--gif", action="store_true", help="a GIF of the first episode, its memory beside the frame")
    p.add_argument("--out", help="directory for the figures (default RUN_DIR/inspect or ./inspect-NAME)")
    p.add_argument("--checkpoint", default="best", choices=["best", "latest"], help="which (default best)")
    p.add_argument("--deterministic", action="store_true", help="take the most likely action")
    _env_overrides(p)
    p.set_defaults(func=_inspect)

    p = sub.add_parser("demos", help="record an expert's demonstrations (successful episodes only)")
    p.add_argument("--env", required=True, help="e.g. BabyAI-GoToLocal-v0 (the BabyAI bot), MiniGrid-MemoryS11-v0")
    p.add_argument("--episodes", type=_positive_int, required=True, help="episodes the expert plays")
    p.add_argument("--expert", help="module:function or path/file.py:function (default: the env's built-in expert)")
    p.add_argument("--out", required=True, help="dataset directory to write")
    p.add_argument("--workers", type=_positive_int, default=1, help="parallel processes (default 1)")
    p.add_argument("--seed", type=int, default=0, help="first env seed (default 0; seeds stay below 500000)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_demos)

    p = sub.add_parser("envs", help="list environment families and registered plug-ins")
    p.set_defaults(func=_envs)

    p = sub.add_parser("compare", help="run a sample-efficiency study (configs/compare/*.yaml) and report it")
    p.add_argument("--config", required=True, help="study config (configs/compare/*.yaml)")
    p.add_argument("--backend", default="local", choices=["local", "ray"], help="where runs go (default local)")
    p.add_argument("--workers", type=_positive_int, default=1, help="runs at a time (default 1; ray: local CPUs)")
    p.add_argument("--address", help="Ray cluster address, e.g. auto (default: start a local Ray instance)")
    p.add_argument("--out", help="study directory (default studies/<study name>)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="override study keys, e.g. 'seeds=[3,4]'")
    p.set_defaults(func=_compare)

    p = sub.add_parser("report", help="re-render the report of a study directory")
    p.add_argument("study_dir", help="a directory made by tlb-rl compare")
    p.set_defaults(func=_report)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, with ``key=value`` overrides taken before or after the options.

    argparse ends a ``nargs="*"`` positional at the first option, so ``eval RUN --episodes 4 env=X`` would
    leave ``env=X`` unparsed (and ``parse_intermixed_args`` refuses subcommands); the leftovers join the
    overrides, in their order, when every one of them is a ``key=value``.
    """
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        args.func(args)
    except (UserError, TrainingError) as e:
        if args.debug:
            raise
        print(f"tlb-rl: error: {e}", file=sys.stderr)
        sys.exit(2 if isinstance(e, UserError) else 1)


if __name__ == "__main__":
    main()
