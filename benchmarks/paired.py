"""What the accuracy studies (tradeoff.py, post_training.py) share: exporting a point to its own directory, int8
graphs beside it, and scoring every point against its dense reference the way `compress eval --against` does
(compressor.evaluation: paired bootstrap CI, agreement, KL fidelity on held-out training rows).

A point's logits (dev rows and fidelity pool) are computed once and cached as WORK/logits/NAME.npz, so that a
re-run scores nothing twice and the dense reference is scored once, not once per comparison.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

# the files of an export directory that an int8 graph's directory copies (tokenizer and config, for eval/bench)
SMALL_FILES = ("config.json", "compress_manifest.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt",
               "special_tokens_map.json")


def export(model, masks, out: Path) -> Path:
    """The (masked, compacted) model exported to ONNX in `out` (parity-verified), with MiniLM's tokenizer."""
    from compressor.default_model import minilm_dir
    from exporters.onnx_export import ExportConfig, export_onnx

    export_onnx(model, out, masks, ExportConfig(seed=0), overwrite=True, tokenizer_dir=minilm_dir())
    return out


def int8_dir(fp32: Path, out: Path, scheme, setup=None) -> Path:
    """`out`: fp32's graph quantized by `scheme` (exporters/quantization.py) as model.onnx, beside fp32's small
    files."""
    import tempfile

    from exporters import quantization as q

    out.mkdir(parents=True, exist_ok=True)
    for f in SMALL_FILES:
        if (fp32 / f).exists():
            shutil.copy(fp32 / f, out / f)
    with tempfile.TemporaryDirectory(prefix="int8-") as tmp:
        pre = q.preprocess(fp32 / "model.onnx", Path(tmp) / "pre.onnx")
        q.quantize(pre, Path(tmp) / "model.onnx", scheme, setup, cache=Path(tmp) / "calibration.json")
        shutil.move(str(Path(tmp) / "model.onnx"), out / "model.onnx")
    return out


class Scorer:
    """Dev and fidelity-pool logits of graphs or PyTorch models, cached per name; paired comparisons."""

    def __init__(self, ctx, pool: list, pool_source: str, cache: Path, batch_size: int = 64):
        from compressor.data import TokenizedDataset, collate

        self.ctx, self.source, self.cache, self.batch_size = ctx, pool_source, cache, batch_size
        self.pool = (TokenizedDataset(pool, ctx.tokenizer, ctx.config.max_length), collate(ctx.tokenizer))
        cache.mkdir(parents=True, exist_ok=True)

    def logits(self, name: str, graph: Path = None, model=None) -> dict:
        path = self.cache / f"{name}.npz"
        if path.is_file():
            return dict(np.load(path))
        if graph is not None:
            from exporters.accuracy import onnx_logits
            from exporters.runtime import make_session

            session = make_session(Path(graph), "cpu")
            run = lambda ds, fn: onnx_logits(session, ds, fn, self.batch_size)  # noqa: E731
        else:
            from compressor.training.loop import predict

            run = lambda ds, fn: predict(model, ds, fn, self.batch_size)  # noqa: E731
        dev, labels = run(self.ctx.dev_set, self.ctx.collate)
        pool, _ = run(*self.pool)
        out = dict(dev=np.asarray(dev), labels=np.asarray(labels), pool=np.asarray(pool))
        np.savez(path, **out)
        return out

    def compare(self, cand: dict, ref: dict, seed: int = 0) -> dict:
        """candidate against reference (logits dicts): metric, difference [low, high] of the main metric in
        points, dev agreement and KL, fidelity agreement and KL."""
        from compressor.evaluation import compare, fidelity

        spec = self.ctx.spec
        c = compare(spec, cand["dev"], ref["dev"], cand["labels"], seed=seed)
        main = next(d for d in c["differences"] if d["metric"] == spec.main_metric)
        fid = fidelity(cand["pool"], ref["pool"], spec.is_regression, self.source)
        return dict(metric=c["candidate"][spec.main_metric], reference=c["reference"][spec.main_metric],
                    difference=100 * main["difference"], low=100 * main["low"], high=100 * main["high"],
                    agreement=c["agreement"]["agreement"], dev_kl=c["agreement"]["mean_kl"],
                    fidelity=dict(agreement=fid["agreement"], mean_kl=fid["mean_kl"], examples=fid["examples"]))
