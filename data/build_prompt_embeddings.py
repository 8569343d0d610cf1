"""Precompute text embeddings for image-free distillation (SwiftBrush): one prompt per line in, an
``.npz`` with ``embeddings`` (N, L, D) float16 and ``null`` (L, D), the empty prompt, out. The text
encoder and tokenizer load from a local diffusers directory or your hub cache (never downloaded).

    python data/build_prompt_embeddings.py prompts.txt data/journeydb_sd21.npz \\
        --model stabilityai/stable-diffusion-2-1-base
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch


@torch.no_grad()
def encode(prompts: list[str], model: str, batch_size: int = 64, device: str = "cpu") -> np.ndarray:
    from transformers import CLIPTextModel, CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer", local_files_only=True)
    enc = CLIPTextModel.from_pretrained(model, subfolder="text_encoder", local_files_only=True).to(device).eval()
    out = []
    for i in range(0, len(prompts), batch_size):
        ids = tok(prompts[i:i + batch_size], padding="max_length", max_length=tok.model_max_length,
                  truncation=True, return_tensors="pt").input_ids.to(device)
        out.append(enc(ids)[0].float().cpu().numpy().astype(np.float16))
    return np.concatenate(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("prompts", type=Path, help="a text file, one prompt per line (duplicates dropped)")
    ap.add_argument("out", type=Path)
    ap.add_argument("--model", required=True, help="diffusers directory or cached hub id with text_encoder/")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    prompts = list(dict.fromkeys(p.strip() for p in args.prompts.read_text().splitlines() if p.strip()))
    if not prompts:
        raise SystemExit(f"no prompt in {args.prompts}")
    emb = encode(prompts, args.model, device=args.device)
    null = encode([""], args.model, device=args.device)[0].astype(np.float32)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp.npz")
    np.savez(tmp, embeddings=emb, null=null)
    tmp.replace(args.out)
    print(f"wrote {len(prompts)} prompt embeddings {emb.shape[1:]} to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
