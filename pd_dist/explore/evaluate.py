"""Evaluate a trained student the same way every time: held-out loss, agreement with its teacher, the gain
over its LM-only baseline, and downstream multiple-choice accuracy through lm-evaluation-harness.

``evaluate_run(run_dir)`` reads what a run left (its resolved config.yaml, the exported student, the
packed data it trained on) and recomputes, on the run's held-out samples:

- ``val_loss`` / ``ppl``: the student's next-token cross-entropy (the run's own final evaluation, redone);
- ``val_kd_loss`` and ``teacher_top1_agreement``: against the run's teacher signal (the teacher model
  when its directory is readable, otherwise the run's store if it holds the held-out samples), with the
  run's signal (truncation or draws), loss kind and temperature;
- ``teacher_val_loss``: the teacher's own held-out loss;
- ``lm_only_val_loss`` and ``pd_gain = (LM - PD) / LM`` in loss (positive: distillation helped) against
  the matching LM-only baseline run, evaluated here on the same samples;
- ``downstream``: accuracy (``acc``, ``acc_norm``) per lm-eval task, given as local task YAML files
  (nothing is downloaded), and ``downstream_gain = (PD - LM) / LM`` per task in the paper's form.

The held-out figures take the route of the run's own evaluation: the teacher signal is asked of a
pd_dist.signals SignalSource (``signal_source``) and the loss sums are the student's
(pd_dist.train.student.held_out_sums), so ``val_loss``, ``val_kd_loss`` and the agreement are the
figures the run's final evaluation recorded in its summary.json, recomputed from the export.

The result is written to ``<run_dir>/eval.json``. A bare Hugging Face model directory can be evaluated
downstream (and on a packed data directory's held-out samples with ``data_dir``).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

Log = Callable[[str], None]


def _load_causal_lm(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), torch_dtype=torch.float32).eval()


def held_out_ids(data, micro_batch: int) -> list:
    """The sample ids of the data's held-out samples (data.val_samples) in micro-batches of
    ``micro_batch``, in order: the batches teacher.inference.held_out_batches yields."""
    val = data.val_ids()
    return [val[s:s + micro_batch] for s in range(0, len(val), micro_batch)]


def held_out_metrics(model, data, micro_batch: int, source=None, kind: str = "nll", temperature: float = 1.0,
                     chunk_size: int = 1024, log: Log = print, document_eos: Optional[int] = None) -> dict:
    """The held-out figures of ``model`` (a causal LM) on ``data``'s held-out samples, by the route a
    run's own evaluation takes: each micro-batch's teacher signal asked of ``source`` (a
    pd_dist.signals SignalSource; None: LM only), the fused loss sums of pd_dist.train.student
    (held_out_sums, alpha 0) and their figures (held_out_figures).

    Returns ``val_loss``, ``ppl`` and ``tokens``, and where the source gave a signal for every
    held-out micro-batch ``val_kd_loss`` and ``teacher_top1_agreement`` (loss ``kind`` at
    ``temperature``, as the run was configured; ``document_eos``: its data.document_mask). Raises
    ValueError when there are no held-out tokens."""
    from pd_dist.signals.sources import NoTeacher
    from pd_dist.train.student import PDStudent, held_out_figures, held_out_sums
    from pd_dist.train.trainer import signalled_micro_batch

    source = source if source is not None else NoTeacher()
    cpu, unsignalled = torch.device("cpu"), [0]

    def micro():
        for ids in held_out_ids(data, micro_batch):
            m = signalled_micro_batch(data, source, ids, cpu)
            unsignalled[0] += m.teacher is None
            yield m

    student = PDStudent(model, kind, temperature, chunk_size, document_eos=document_eos).eval()
    sums = held_out_sums(student, micro())
    n = int(sums[2].item())
    if not n:
        raise ValueError("no held-out tokens to evaluate on (data.val_samples = 0?)")
    if source.has_signal and unsignalled[0]:
        log(f"[eval] no teacher signal for {unsignalled[0]} held-out micro-batch(es) (the store holds no "
            f"held-out samples): KD figures skipped")
    figures = held_out_figures(sums, with_kd=source.has_signal and not unsignalled[0])
    return {"val_loss": figures.pop("val_loss"), "ppl": figures.pop("ppl"), "tokens": n, **figures}


def downstream(model_dir: Path, tasks: Sequence[Path], batch_size: int = 8, limit: Optional[int] = None,
               log: Log = print) -> dict:
    """lm-eval accuracy of a save_pretrained model on local task YAML files: {task: {acc, acc_norm}}."""
    if not tasks:
        return {}
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise RuntimeError("downstream evaluation needs lm-eval: pip install -e '.[eval]'") from None
    import yaml

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    names, dirs = [], []
    for t in tasks:
        t = Path(t)
        spec = yaml.safe_load(t.read_text())
        if not isinstance(spec, dict) or "task" not in spec:
            raise ValueError(f"{t}: not an lm-eval task file (no `task:` key)")
        names.append(spec["task"])
        dirs.append(str(t.resolve().parent))
    log(f"[eval] lm-eval {', '.join(names)} on {model_dir}")
    res = lm_eval.simple_evaluate(model="hf", model_args={"pretrained": str(model_dir), "dtype": "float32",
                                                          "device": "cpu"},
                                  tasks=names, task_manager=TaskManager(include_path=sorted(set(dirs))),
                                  batch_size=batch_size, limit=limit, log_samples=False)
    out = {}
    for name in names:
        r = res["results"][name]
        out[name] = {m: r[f"{m},none"] for m in ("acc", "acc_norm") if f"{m},none" in r}
        out[name]["samples"] = r.get("sample_len") or res.get("n-samples", {}).get(name, {}).get("effective")
    return out


def signal_source(cfg, data, log: Log = print):
    """The run's teacher signal for its held-out samples, as a pd_dist.signals SignalSource on the CPU
    in fp32: a colocated teacher when the teacher's weights are readable (teacher.path, or the run's
    pre-trained default teacher), else (distill.mode offline) the run's store, which gives the held-out
    samples only when it holds them (generate.include_val); NoTeacher for an LM-only run or when neither
    is readable (the KD figures are then skipped). The signal is the run's (distill.signal, its draws
    keyed by train.seed and the sample ids, as in training)."""
    import copy
    import dataclasses

    from pd_dist.models import build_model
    from pd_dist.run import teacher_export_dir
    from pd_dist.signals.sources import NoTeacher, SourceContext, build_source

    d = cfg.distill
    if d.mode == "none":
        return NoTeacher()
    tdir = teacher_export_dir(cfg)
    ecfg = copy.deepcopy(cfg)
    ecfg.train = dataclasses.replace(cfg.train, precision="fp32")

    pair = None
    if d.cross_tokenizer != "off":  # the teacher reads its own tokenization, prepared beside the run's data
        from pd_dist.data import PackedDataset
        from pd_dist.run import teacher_view_dir
        from pd_dist.teacher.crosstok import CrossTokenizer

        view = teacher_view_dir(data.path, cfg.teacher.path) if cfg.teacher.path else None
        if view is None or not (view / "meta.json").is_file():
            log(f"[eval] the teacher's view of the data ({view}) is missing: KD figures skipped")
            return NoTeacher()
        pair = CrossTokenizer.build(cfg, data, PackedDataset(view), log=log)
    tdata = pair.align.teacher if pair is not None else data

    def teacher():
        return build_model(type(cfg.teacher)(path=str(tdir)), tdata.vocab_size, seed=0)

    if (tdir / "config.json").is_file():
        ecfg.distill = dataclasses.replace(d, mode="colocated")
    elif not (d.mode == "offline" and d.store):
        log(f"[eval] no teacher signal readable for this run ({tdir} missing): KD figures skipped")
        return NoTeacher()
    return build_source(SourceContext(ecfg, None, data, torch.device("cpu"), teacher=teacher, log=log, pair=pair))


def evaluate_run(run_dir: str | os.PathLike, tasks: Sequence[Path] = (), baseline: Optional[Path] = None,
                 log: Log = print, write: bool = True) -> dict:
    """Evaluate one run directory (see the module docstring) and write <run_dir>/eval.json."""
    from pd_dist.config import load_config
    from pd_dist.data import PackedDataset

    run_dir = Path(run_dir)
    if (run_dir / "config.json").is_file() and not (run_dir / "config.yaml").is_file():
        raise ValueError(f"{run_dir} is a model directory, not a run: use evaluate_model")
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"{run_dir}: no config.yaml (not a pd-dist run directory)")
    if not (run_dir / "student" / "config.json").is_file():
        raise FileNotFoundError(f"{run_dir}: no exported student (the run has not finished)")
    cfg = load_config(run_dir / "config.yaml")
    data = PackedDataset(Path(cfg.data.dir) if cfg.data.dir else run_dir / "data")
    mb, chunk = cfg.train.micro_batch_size, cfg.train.loss_chunk_size
    source = signal_source(cfg, data, log)
    eos = data.document_eos(cfg.data.document_mask)
    try:
        result = held_out_metrics(_load_causal_lm(run_dir / "student"), data, mb, source, cfg.distill.kd_loss,
                                  cfg.distill.loss_temperature, chunk, log=log, document_eos=eos)
        teacher_loss = source.teacher_val_loss()
    finally:
        source.close()
    result["teacher_val_loss"] = teacher_loss if teacher_loss is not None else _summary(run_dir).get(
        "teacher_val_loss")
    result["downstream"] = downstream(run_dir / "student", tasks, log=log)
    if baseline is None:
        point = run_dir / "point.json"
        if point.is_file():
            b = json.loads(point.read_text()).get("baseline_dir")
            baseline = Path(b) if b else None
        elif (run_dir / "baseline" / "student" / "config.json").is_file():
            baseline = run_dir / "baseline"  # the run's own cached LM-only twin (`baseline: true`)
    result.update(lm_only_val_loss=None, pd_gain=None, downstream_gain={}, baseline_dir=None)
    if baseline is not None and (Path(baseline) / "student" / "config.json").is_file():
        base = held_out_metrics(_load_causal_lm(Path(baseline) / "student"), data, mb, chunk_size=chunk, log=log,
                                document_eos=eos)
        lm, pd = base["val_loss"], result["val_loss"]
        result.update(lm_only_val_loss=lm, pd_gain=(lm - pd) / lm, baseline_dir=str(baseline))
        if tasks:
            b_eval = Path(baseline) / "eval.json"
            b_down = json.loads(b_eval.read_text()).get("downstream", {}) if b_eval.is_file() else {}
            if set(b_down) != set(result["downstream"]):
                b_down = downstream(Path(baseline) / "student", tasks, log=log)
            result["lm_only_downstream"] = b_down
            result["downstream_gain"] = {t: (r["acc"] - b_down[t]["acc"]) / b_down[t]["acc"]
                                         if b_down.get(t, {}).get("acc") else None
                                         for t, r in result["downstream"].items()}
    elif baseline is not None:
        log(f"[eval] baseline {baseline} has no exported student yet: gain not computed")
    result["tasks"] = [str(Path(t).resolve()) for t in tasks]
    if write:
        (run_dir / "eval.json").write_text(json.dumps(result, indent=1))
    log(f"[eval] {run_dir}: val_loss {result['val_loss']:.4f}"
        + (f" | LM-only {result['lm_only_val_loss']:.4f} | gain {result['pd_gain']:+.2%}" if result["pd_gain"] is not None else "")
        + (f" | agreement {result['teacher_top1_agreement']:.3f}" if "teacher_top1_agreement" in result else "")
        + "".join(f" | {t} acc {r.get('acc', float('nan')):.3f}" for t, r in result["downstream"].items()))
    return result


def evaluate_model(model_dir: str | os.PathLike, tasks: Sequence[Path] = (), data_dir: Optional[Path] = None,
                   micro_batch: int = 8, log: Log = print) -> dict:
    """A bare save_pretrained directory: downstream accuracy, and held-out loss on a packed data dir."""
    from pd_dist.data import PackedDataset

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir}: no config.json (not a Hugging Face model directory)")
    result: dict = {}
    if data_dir is not None:
        data = PackedDataset(data_dir)
        result.update(held_out_metrics(_load_causal_lm(model_dir), data, micro_batch, log=log))
    result["downstream"] = downstream(model_dir, tasks, log=log)
    return result


def _summary(run_dir: Path) -> dict:
    f = run_dir / "summary.json"
    return json.loads(f.read_text()) if f.is_file() else {}
