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

The result is written to ``<run_dir>/eval.json``. A bare Hugging Face model directory can be evaluated
downstream (and on a packed data directory's held-out samples with ``data_dir``).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

Log = Callable[[str], None]


def _load_causal_lm(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), torch_dtype=torch.float32).eval()


@torch.no_grad()
def held_out_metrics(student, batches, teacher=None, kind: str = "nll", temperature: float = 1.0,
                     chunk_size: int = 1024) -> dict:
    """Mean LM loss, and with a teacher (a callable input_ids -> SparseLogits) the mean KD loss and top-1
    agreement, over held-out [B, T + 1] windows; the fused chunked loss the training uses."""
    from pd_dist.core.losses import fused_pd_loss
    from pd_dist.models import final_norm_and_head

    body, head = final_norm_and_head(student)
    sums = torch.zeros(4, dtype=torch.float64)
    for window in batches:
        inp, tgt = window[:, :-1], window[:, 1:]
        hidden = body(input_ids=inp).last_hidden_state.flatten(0, 1)
        sig = None if teacher is None else teacher(inp).reshape(-1)
        out = fused_pd_loss(hidden, head.weight, tgt.flatten(), sig, 0.5 if sig is not None else 0.0, kind,
                            temperature, 1.0, chunk_size=chunk_size)
        sums += torch.stack([out.lm_sum.double(), out.kd_sum.double(), out.n_tokens.double(),
                             out.top1_agree.double()])
    n = sums[2].item()
    if not n:
        raise ValueError("no held-out tokens to evaluate on (data.val_samples = 0?)")
    res = {"val_loss": sums[0].item() / n, "ppl": math.exp(min(sums[0].item() / n, 50.0)), "tokens": int(n)}
    if teacher is not None:
        res.update(val_kd_loss=sums[1].item() / n, teacher_top1_agreement=sums[3].item() / n)
    return res


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


def _teacher_for(cfg, data, log: Log):
    """The run's teacher signal for held-out samples: its teacher model, else its store; None if neither."""
    from pd_dist.teacher.inference import FrozenTeacher
    from pd_dist.models import build_model
    from pd_dist.run import teacher_export_dir

    d = cfg.distill
    if d.mode == "none":
        return None, None
    tdir = teacher_export_dir(cfg)
    val = data.val_ids()
    mb = cfg.train.micro_batch_size
    # the held-out micro-batches' sample ids, in the order held_out_batches yields them (a drawn
    # signal's draws are keyed by them)
    ids = iter([val[s:s + mb] for s in range(0, len(val), mb)])
    signal = d.signal_spec(cfg.train.seed)
    if (tdir / "config.json").is_file():
        model = build_model(type(cfg.teacher)(path=str(tdir)), data.vocab_size, seed=0)
        frozen = FrozenTeacher(model, torch.device("cpu"), torch.float32, signal, cfg.train.loss_chunk_size)
        return (lambda inp: frozen(inp, next(ids))), frozen
    if d.mode == "offline" and d.store:
        from pd_dist.store import open_for_training

        store = open_for_training(d.store, data_fingerprint=data.fingerprint,
                                  tokenizer_hash=data.meta["tokenizer_hash"], seq_len=data.seq_len,
                                  vocab_size=data.vocab_size, signal=signal)
        if len(store) > int(val.max()):
            return (lambda inp: store.get_batch(next(ids)).without_lse()), None
    log(f"[eval] no teacher signal readable for this run ({tdir} missing): KD figures skipped")
    return None, None


def evaluate_run(run_dir: str | os.PathLike, tasks: Sequence[Path] = (), baseline: Optional[Path] = None,
                 log: Log = print, write: bool = True) -> dict:
    """Evaluate one run directory (see the module docstring) and write <run_dir>/eval.json."""
    from pd_dist.config import load_config
    from pd_dist.data import PackedDataset
    from pd_dist.teacher.inference import held_out_batches

    run_dir = Path(run_dir)
    if (run_dir / "config.json").is_file() and not (run_dir / "config.yaml").is_file():
        raise ValueError(f"{run_dir} is a model directory, not a run: use evaluate_model")
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"{run_dir}: no config.yaml (not a pd-dist run directory)")
    if not (run_dir / "student" / "config.json").is_file():
        raise FileNotFoundError(f"{run_dir}: no exported student (the run has not finished)")
    cfg = load_config(run_dir / "config.yaml")
    data = PackedDataset(Path(cfg.data.dir) if cfg.data.dir else run_dir / "data")
    batches = list(held_out_batches(data, cfg.train.micro_batch_size))
    teacher, frozen = _teacher_for(cfg, data, log)
    result = held_out_metrics(_load_causal_lm(run_dir / "student"), batches, teacher, cfg.distill.loss,
                              cfg.distill.loss_temperature, cfg.train.loss_chunk_size)
    result["teacher_val_loss"] = frozen.val_loss(batches) if frozen is not None else _summary(run_dir).get(
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
        base = held_out_metrics(_load_causal_lm(Path(baseline) / "student"), batches)
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
    from pd_dist.teacher.inference import held_out_batches

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir}: no config.json (not a Hugging Face model directory)")
    result: dict = {}
    if data_dir is not None:
        data = PackedDataset(data_dir)
        result.update(held_out_metrics(_load_causal_lm(model_dir), list(held_out_batches(data, micro_batch))))
    result["downstream"] = downstream(model_dir, tasks, log=log)
    return result


def _summary(run_dir: Path) -> dict:
    f = run_dir / "summary.json"
    return json.loads(f.read_text()) if f.is_file() else {}
