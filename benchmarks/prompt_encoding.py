"""Seconds to encode the zero-shot prompts of many classes: richkd's (each prompt once, tokenized from its parts, the
text tower cut after the longest prompt of a batch) against open_clip's `build_zero_shot_classifier` as richkd called
it before, ten classes per batch and every template encoded twice (once in the ensemble, once alone for the
per-template embeddings). Goal: >= 10x at 10,000 classes.

Both on the same CLIP text tower (random weights; the architecture sets the cost), on this machine's CPU, and
the two results are checked to agree.

    python benchmarks/prompt_encoding.py [--classes 10000] [--clip richkd-tiny] [--templates 12]
"""

from __future__ import annotations

import argparse
import json
import time

import open_clip
import torch

from richkd.pipeline.clip import DEFAULT_TEMPLATES, load_clip
from richkd.pipeline.prompts import zero_shot_classifier


@torch.inference_mode()
def encoded_as_before(clip, class_names: list[str], templates: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    def classifier(template_set) -> torch.Tensor:
        return open_clip.build_zero_shot_classifier(clip.model, clip.tokenizer, class_names, template_set,
                                                    num_classes_per_batch=10, device="cpu").T.float()

    return classifier(templates), torch.stack([classifier([template]) for template in templates], dim=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=10000)
    parser.add_argument("--clip", default="richkd-tiny", help="open_clip architecture (random weights)")
    parser.add_argument("--templates", type=int, default=len(DEFAULT_TEMPLATES),
                        help=f"how many of richkd's {len(DEFAULT_TEMPLATES)} default templates")
    args = parser.parse_args()
    clip = load_clip(args.clip, "random")
    class_names = [f"class number {index}" for index in range(args.classes)]
    templates = list(DEFAULT_TEMPLATES)[:args.templates]
    seconds, results = {}, {}
    for name, encode in (("before: open_clip, 10 classes per batch, twice", encoded_as_before),
                         ("richkd: each prompt once, from its parts, cut", zero_shot_classifier)):
        started = time.perf_counter()
        results[name] = encode(clip, class_names, templates)
        seconds[name] = time.perf_counter() - started
        print(f"{name}: {seconds[name]:.1f} s", flush=True)
    before, now = results.values()
    agree = all(torch.allclose(a, b, atol=1e-5) for a, b in zip(before, now))
    ratio = seconds[next(iter(seconds))] / seconds[list(seconds)[1]]
    print(json.dumps({"classes": args.classes, "templates": len(templates), "clip": args.clip,
                      "torch_threads": torch.get_num_threads(), "seconds": seconds, "speedup": round(ratio, 2),
                      "results_agree": agree}))


if __name__ == "__main__":
    main()
