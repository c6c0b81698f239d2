"""`pd-dist` command line: train, data preparation, config inspection. Thin: parse, build, run, close."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from pd_dist.core.configlib import ConfigError


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="experiment YAML (default launch/configs/default.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set distill.top_k=20 (repeatable)")


def train_main(argv: list[str] | None = None) -> int:
    """Entry point of launch/pretrain_pd.py (started by deepspeed, torchrun, srun or mpirun)."""
    p = argparse.ArgumentParser(prog="pretrain_pd", description="pre-training distillation of a student LM")
    _add_config_args(p)
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")
    p.add_argument("--auto-resume", action="store_true",
                   help="resume when output_dir holds checkpoints (the objective is still checked), else start; "
                        "what the Slurm script passes, so a requeued job continues by itself")
    p.add_argument("--resume-override", action="append", default=[], metavar="KEY",
                   help="with --resume: accept a deliberate change of this objective key (e.g. distill.loss); "
                        "recorded in output_dir/resume_overrides.jsonl; repeatable")
    p.add_argument("--dry-run", action="store_true",
                   help="print the rank map (role, replica, stage, data-parallel rank, who serves whom) and exit")
    p.add_argument("--nodes", type=int, default=None, help="--dry-run: nodes (default: the launcher's)")
    p.add_argument("--ranks-per-node", type=int, default=None,
                   help="--dry-run: ranks per node (default: the launcher's)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    from pd_dist.config import load_config
    from pd_dist.data import DataError, resolve_sources
    from pd_dist.cluster.topology import LaunchEnv

    try:
        cfg = load_config(args.config, args.overrides)
        env = LaunchEnv.from_environ()
        local = int(os.environ.get("LOCAL_SIZE", "0") or 0)
        if args.dry_run:
            from pd_dist.explore.plan import print_rank_map

            return print_rank_map(cfg, args.nodes or (env.world_size // local if local else 1),
                                  args.ranks_per_node or local or env.world_size)
        if args.resume_override:
            if not (args.resume or args.auto_resume):
                raise ConfigError("--resume-override is only meaningful with --resume or --auto-resume")
            from pd_dist.train.checkpoint import check_override_keys

            check_override_keys(args.resume_override, cfg)
        resolve_sources(cfg.data)  # inputs exist and are of a known kind, before any process group
        online = cfg.distill.mode == "online"
        if online and env.world_size < 2:
            raise ConfigError("config key 'distill.mode' = 'online': needs at least 2 ranks (teacher + "
                              "student); launch with e.g. deepspeed --num_gpus 2, or use colocated")
        # Before any process group starts: with a uniform launcher layout the node of every rank is known.
        nodes = [f"node{r // local}" for r in range(env.world_size)] if local else None
        if not online or nodes or cfg.topology.teacher_ranks:
            cfg.check_world(cfg.layout(env.world_size, nodes).dp)
    except (ConfigError, ValueError) as e:  # DataError is a ValueError
        print(f"pd-dist: {e}", file=sys.stderr)
        return 2
    from pd_dist.cluster.bridge import PeerError
    from pd_dist.cluster.topology import init_topology
    from pd_dist.run import run_experiment

    try:
        topo = init_topology(env=env, topology=cfg.topology, **cfg.layout_args())
        cfg.check_world(topo.dp_size)
    except ConfigError as e:
        print(f"pd-dist: {e}", file=sys.stderr)
        return 2
    from pd_dist.train.checkpoint import CheckpointWriteError, ResumeError

    try:
        run_experiment(cfg, topo, resume=True if args.resume else "auto" if args.auto_resume else False,
                       resume_overrides=args.resume_override)
    except ResumeError as e:
        if topo.role_rank == 0:
            print(f"pd-dist: {e}", file=sys.stderr)
        return 2
    except DataError as e:
        print(f"pd-dist: {e}", file=sys.stderr)
        return 2
    except (PeerError, CheckpointWriteError) as e:
        _die(env.rank, str(e))
    except RuntimeError as e:
        # A collective failed because some rank left: for a student, the teacher if it is the one gone
        # (its connection closed); else the rank whose heartbeat stopped.
        me = f"{topo.role} {topo.describe(topo.rank)}"
        first = str(e).splitlines()[0][:200]
        if topo.online and topo.role == "student" and not topo.teacher_failover:  # else it was replaced
            from pd_dist.cluster.bridge import peer_is_gone

            if peer_is_gone(topo.bridge, topo.my_teacher()):
                _die(env.rank, f"{me}: teacher {topo.describe(topo.my_teacher())} closed the connection "
                               "(exited or crashed)")
        gone = topo.dead_ranks()
        if gone:
            role = (lambda r: "teacher " if r in topo.layout.teachers else "student ") if topo.online else \
                (lambda r: "")
            _die(env.rank, f"{me}: {', '.join(role(r) + topo.describe(r) for r in gone)} stopped mid-run "
                           f"(no heartbeat); its log says why; continue with --resume. Here: {first}")
        import traceback

        traceback.print_exc()
        if topo.online:
            _die(env.rank, f"{me}: a peer in the {topo.role} world failed: {first}")
        raise
    topo.close()
    return 0


def generate_main(argv: list[str] | None = None) -> int:
    """Entry point of launch/generate_logits.py: every rank is a teacher rank writing its shards."""
    p = argparse.ArgumentParser(prog="generate_logits",
                                description="write the offline teacher-logits store (distill.store)")
    _add_config_args(p)
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    from pd_dist.config import load_config
    from pd_dist.data import DataError, resolve_sources
    from pd_dist.store import StoreError

    try:
        cfg = load_config(args.config, args.overrides)
        if not cfg.distill.store:
            raise ConfigError("config key 'distill.store' = None: name the directory to write the store to")
        resolve_sources(cfg.data)
    except (ConfigError, DataError) as e:
        print(f"pd-dist: {e}", file=sys.stderr)
        return 2
    from pd_dist.run import generate_store
    from pd_dist.cluster.topology import init_topology

    topo = init_topology()
    try:
        generate_store(cfg, topo)
    except StoreError as e:
        print(f"pd-dist: {e}", file=sys.stderr)
        return 1
    except DataError as e:
        print(f"pd-dist: {e}", file=sys.stderr)
        return 2
    finally:
        topo.close()
    return 0


def store_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="pd-dist store", description="inspect or check a teacher-logits store")
    p.add_argument("action", choices=["info", "verify"])
    p.add_argument("path")
    p.add_argument("--json", action="store_true", help="info: print JSON")
    p.add_argument("--fidelity", action="store_true", help=(
        "info: also the stored signal against the teacher's full distribution on a sample of positions "
        "(head mass, TV, KL both ways, JSD; pd_dist.core.fidelity), recomputed by the store's teacher; needs --data"))
    p.add_argument("--data", default=None, help="--fidelity: the prepared data directory the store was written from")
    p.add_argument("--positions", type=int, default=2048, help="--fidelity: positions sampled (default 2048)")
    p.add_argument("--teacher", default=None, help=(
        "--fidelity: the teacher's directory (default: where the manifest records it; needed for a teacher "
        "pre-trained by pd-dist, recorded by name; checked against the manifest's weights hash)"))
    args = p.parse_args(argv)
    if args.fidelity and (args.action != "info" or not args.data):
        p.error("--fidelity goes with info and needs --data DIR (the prepared data the store was written from)")
    import json

    from pd_dist.data import DataError
    from pd_dist.store import StoreCheckError, StoreError, store_info, verify_store
    from pd_dist.store.library import library_stores

    # A library of document stores (distill.teacher_context document): each source's store in turn. A
    # manifest there, readable or not, makes the path one store (its faults reported as such).
    lone = os.path.lexists(os.path.join(args.path, "manifest.json"))
    paths = (None if lone else library_stores(args.path)) or [args.path]
    if args.action == "verify":  # exit 0: sound, 1: faults found, 2: could not check
        worst = 0
        for path in paths:
            try:
                faults = verify_store(path)
            except StoreCheckError as e:
                print(f"pd-dist: {e}", file=sys.stderr)
                worst = 2
                continue
            for f in faults:
                print(f"FAULT {f}")
            print(f"{path}: {'OK' if not faults else f'{len(faults)} fault(s)'}")
            worst = max(worst, 1 if faults else 0)
        return worst
    try:
        infos = [store_info(path) for path in paths]
        if args.fidelity:
            from pd_dist.data import PackedDataset
            from pd_dist.teacher.fidelity import store_fidelity

            data = PackedDataset(args.data)
            for info, path in zip(infos, paths):
                try:
                    info["fidelity"] = store_fidelity(path, data, args.positions, teacher=args.teacher)
                except StoreError as e:  # a library: the stores of sources the data does not hold are skipped
                    if len(paths) == 1:
                        raise
                    info["fidelity"] = f"not measured: {e}"
    except (StoreError, DataError) as e:
        print(f"pd-dist: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(infos[0] if len(infos) == 1 and paths == [args.path] else infos, indent=1))
    else:
        for n, info in enumerate(infos):
            if n:
                print()
            for k, v in info.items():
                print(f"{k:28s} {json.dumps(v) if isinstance(v, (dict, list)) else v}")
    return 0


def _die(rank: int, message: str) -> None:
    """One line naming the peer, then out at once: tearing down groups with a dead peer can hang."""
    sys.stdout.flush()
    print(f"pd-dist: rank {rank}: {message}", file=sys.stderr, flush=True)
    os._exit(3)


def data_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="pd-dist data", description="prepare or inspect a run's data")
    sub = p.add_subparsers(dest="action", required=True)
    prep = sub.add_parser("prepare", description=(
        "tokenize the configured sources into Megatron-format shards (train a BPE first if no tokenizer is "
        "given) and check indexed ones; under a launcher (deepspeed launch/prepare_data.py, srun, mpirun, "
        "torchrun) the ranks split the work; resumable"))
    _add_config_args(prep)
    prep.add_argument("--out", default=None, help="output directory (default data.dir or <output_dir>/data)")
    prep.add_argument("--workers", type=int, default=None,
                      help="tokenizer processes on this rank (default data.prepare_workers, 0: the cores / ranks here)")
    prep.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    info = sub.add_parser("info", description="what a prepared data directory holds")
    info.add_argument("path")
    args = p.parse_args(argv)
    from pd_dist.data import DataError

    if args.action == "info":
        from pd_dist.data import PackedDataset

        try:
            d = PackedDataset(args.path)
        except DataError as e:
            print(f"pd-dist: {e}", file=sys.stderr)
            return 2
        m = d.meta
        print(f"{args.path}: {m['n_tokens']:,} tokens, {m['n_docs']:,} documents, {m['n_samples']:,} samples of "
              f"{m['seq_len']} ({m['n_val']} held out), vocab {m['vocab_size']}, fingerprint {m['fingerprint']}")
        for e in m["sources"]:
            print(f"  {e['kind']:9s} {e['label']}: weight {e['weight']:g} ({100 * e['share']:.2f}% of samples), "
                  f"{e['n_tokens']:,} tokens, {e['n_docs']:,} documents, {len(e['prefixes'])} shard(s)"
                  + (f", cut by data.max_chars after {e['truncated']['documents']:,} documents" if e["truncated"] else ""))
        return 0
    from pd_dist.config import load_config
    from pd_dist.data import prepare_data
    from pd_dist.core.runtime import local_ranks
    from pd_dist.cluster.topology import LaunchEnv

    try:
        cfg = load_config(args.config, args.overrides)
        env = LaunchEnv.from_environ()
        workers = args.workers or cfg.data.prepare_workers or max(1, (os.cpu_count() or 1) // local_ranks())
        out = args.out or cfg.data.dir or str(Path(cfg.output_dir) / "data")
        prepare_data(cfg.data, out, rank=env.rank, world=env.world_size, workers=workers)
    except (ConfigError, DataError) as e:
        print(f"pd-dist: {e}", file=sys.stderr)
        return 2
    return 0


def prepare_main(argv: list[str]) -> int:
    """`pd-dist prepare-data`: the earlier name of `pd-dist data prepare`."""
    return data_main(["prepare", *argv])


def config_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="pd-dist config", description="print the resolved config, or all keys")
    _add_config_args(p)
    p.add_argument("--keys", action="store_true", help="list every config key with its default and meaning")
    p.add_argument("--doc", action="store_true", help="print docs/config.md")
    args = p.parse_args(argv)
    from pd_dist.config import config_doc, config_keys_markdown, dump_config, load_config

    if args.doc:
        print(config_doc(), end="")
        return 0
    if args.keys:
        print(config_keys_markdown())
        return 0
    try:
        print(dump_config(load_config(args.config, args.overrides)), end="")
    except ConfigError as e:
        print(f"pd-dist: {e}", file=sys.stderr)
        return 2
    return 0


def sweep_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="pd-dist sweep", description=(
        "run a design-space sweep: every point a normal run through the real launcher, an LM-only "
        "baseline per (student, seed), one shared store per teacher; resumable"))
    p.add_argument("sweep", help="sweep YAML (see pd_dist/explore/sweep.py, launch/configs/paper/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for every point (e.g. model.preset=pd-1.9b)")
    p.add_argument("--dry-run", action="store_true", help="list the points, what they share, their state and cost")
    p.add_argument("--slurm", action="store_true", help="write the Slurm array scripts and submit them")
    p.add_argument("--partition", default=None, help="--slurm: partition")
    p.add_argument("--no-eval", action="store_true", help="do not run pd-dist eval after each point")
    args = p.parse_args(argv)
    from pd_dist.explore.sweep import Sweep, SweepSpec

    try:
        sweep = Sweep(SweepSpec.load(args.sweep, args.overrides))
    except (ConfigError, ValueError) as e:
        print(f"pd-dist: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(sweep.describe())
        if args.slurm:
            for name, text in sweep.slurm_scripts(args.partition).items():
                print(f"\n# {name}\n{text}", end="")
        return 0
    try:
        if args.slurm:
            ids = sweep.submit_slurm(args.partition)
            print(f"pd-dist sweep: submitted Slurm job(s) {', '.join(ids)}; scripts in {sweep.out / 'slurm'}")
        else:
            sweep.run(evaluate=not args.no_eval)
    except RuntimeError as e:
        print(f"pd-dist: {e}", file=sys.stderr)
        return 1
    return 0


def eval_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="pd-dist eval", description=(
        "evaluate a run (held-out loss, agreement and KD loss against its teacher, gain over its LM-only "
        "baseline, downstream accuracy) or a Hugging Face model directory; writes <run>/eval.json"))
    p.add_argument("path", help="a run's output_dir, or a save_pretrained model directory")
    p.add_argument("--tasks", action="append", default=[], metavar="TASK.yaml",
                   help="lm-eval task file (local data; repeatable)")
    p.add_argument("--baseline", default=None, help="the LM-only baseline run (default: the run's own)")
    p.add_argument("--data", default=None, help="model directory: a packed data dir for held-out loss")
    args = p.parse_args(argv)
    import json

    from pd_dist.explore.evaluate import evaluate_model, evaluate_run

    path = Path(args.path)
    try:
        for t in args.tasks:
            if not Path(t).is_file():
                raise FileNotFoundError(f"--tasks {t}: no such file")
        if (path / "config.yaml").is_file():
            evaluate_run(path, [Path(t) for t in args.tasks], Path(args.baseline) if args.baseline else None)
        else:
            res = evaluate_model(path, [Path(t) for t in args.tasks], Path(args.data) if args.data else None)
            print(json.dumps(res, indent=1))
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"pd-dist: {e}", file=sys.stderr)
        return 2
    return 0


def report_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="pd-dist report", description=(
        "write <sweep>/report.md (a table per axis, gain over LM-only, seed spread) and plots/ from the "
        "sweep's run directories"))
    p.add_argument("sweep_dir")
    p.add_argument("--no-plots", action="store_true")
    args = p.parse_args(argv)
    from pd_dist.explore.report import write_report

    try:
        out = write_report(args.sweep_dir, with_plots=not args.no_plots)
    except FileNotFoundError as e:
        print(f"pd-dist: {e}", file=sys.stderr)
        return 2
    print(out.read_text(), end="")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from pd_dist.explore.plan import main as plan_main

    commands = {"train": train_main, "data": data_main, "prepare-data": prepare_main, "config": config_main,
                "plan": plan_main,
                "store": store_main, "generate": generate_main, "sweep": sweep_main, "eval": eval_main,
                "report": report_main}
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        print("usage: pd-dist {" + ",".join(commands) + "} [options]\n"
              "  train         run training in this process (multi-rank: deepspeed launch/pretrain_pd.py)\n"
              "  data          prepare CONFIG: tokenize the sources into shards (multi-rank: deepspeed\n"
              "                launch/prepare_data.py); info DIR: what prepared data holds\n"
              "  config        print the resolved config (--keys: every key, documented)\n"
              "  plan          teacher:student rank split, wire bytes and store size for online PD\n"
              "  store         info|verify PATH: inspect or check a teacher-logits store\n"
              "  generate      write the store in this process (multi-rank: deepspeed launch/generate_logits.py)\n"
              "  sweep         run a design-space sweep of runs (resumable; --dry-run, --slurm)\n"
              "  eval          evaluate a run or model: held-out loss, gain over LM-only, lm-eval tasks\n"
              "  report        tables and plots of a sweep, recomputed from its runs",
              file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return commands[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
