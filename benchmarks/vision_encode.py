"""Seconds and peak memory to encode images and video with the full-size Gemma 4 vision tower (random weights).

    python benchmarks/vision_encode.py                 # one image at the 280-token budget, then a 32-frame video
    python benchmarks/vision_encode.py --what image --dtype bfloat16 --device cuda

Each case runs in a fresh process (so that its peak memory is its own): the tower and `embed_vision` of
google/diffusiongemma-26B-A4B-it (27 layers, width 1152, ~573M parameters) with random weights, fed by dgemma's
processor. `processor_s`: decoding, resizing and patchifying; `tower_s`: the tower over every patch (padding
included, as the reference runs it), median of `--repeat` runs after `--warmup` untimed ones. Prints one JSON
object.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import Parser, machine_info, median, timed  # noqa: E402

from dgemma.config import gemma4_vision  # noqa: E402
from dgemma.media import ImageProcessor  # noqa: E402
from dgemma.media.video import DEFAULT_FRAMES, VIDEO_BUDGET  # noqa: E402
from dgemma.model.vision import VisionEmbedder, VisionTower  # noqa: E402

TEXT_HIDDEN = 2816  # the 26B-A4B text width: embed_vision's output


def _rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def run_case(what: str, dtype: str, device: str, repeat: int, warmup: int) -> dict:
    from PIL import Image

    rng = np.random.default_rng(0)
    config = gemma4_vision()
    torch.manual_seed(0)
    with torch.device(device):
        tower = VisionTower(config).to(getattr(torch, dtype)).eval()
        embed = VisionEmbedder(config, TEXT_HIDDEN).to(getattr(torch, dtype)).eval()
    for p in [*tower.parameters(), *embed.parameters()]:
        torch.nn.init.normal_(p, std=0.02) if p.dim() > 1 else torch.nn.init.ones_(p)
    parameters = sum(p.numel() for p in [*tower.parameters(), *embed.parameters()])
    loaded_gib = _rss_gib()
    processor = ImageProcessor()
    if what == "image":  # a 4:3 photo-sized image: 1024x768 -> 912x672 -> 266 tokens (2520 patches run)
        sources = [Image.fromarray(rng.integers(0, 256, (768, 1024, 3), dtype=np.uint8))]
        budget = 280
    else:  # 32 frames of 1920x1080 at 70 tokens each (528x288 -> 66 tokens; 630 patches run per frame)
        sources = [Image.fromarray(rng.integers(0, 256, (1080, 1920, 3), dtype=np.uint8)) for _ in range(DEFAULT_FRAMES)]
        budget = VIDEO_BUDGET
    processed, processor_s = timed(lambda: processor(sources, max_soft_tokens=budget))
    pixels = torch.from_numpy(processed.pixel_values).to(device)
    positions = torch.from_numpy(processed.image_position_ids).to(device)

    @torch.inference_mode()
    def encode():
        return embed(tower(pixels, positions))

    times = []
    for i in range(warmup + repeat):
        out, seconds = timed(encode, device)
        if i >= warmup:
            times.append(seconds)
    result = {"what": what, "items": len(sources), "budget": budget, "patches_per_item": pixels.shape[1],
              "soft_tokens": int(out.shape[0]), "parameters": parameters, "dtype": dtype, "processor_s": processor_s,
              "tower_s": median(times), "tower_s_all": times, "peak_rss_gib": _rss_gib(),
              "rss_after_weights_gib": loaded_gib}
    if device.startswith("cuda"):
        result["peak_cuda_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return result


def main() -> None:
    parser = Parser(prog="benchmarks/vision_encode.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--what", choices=("image", "video", "both"), default="both")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeat", type=int, default=1, help="timed runs (default 1)")
    parser.add_argument("--warmup", type=int, default=0, help="untimed runs first (default 0; use 1+ on a GPU)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.what != "both":
        print(json.dumps(run_case(args.what, args.dtype, args.device, args.repeat, args.warmup)))
        return
    cases = []
    for what in ("image", "video"):
        cmd = [sys.executable, __file__, "--what", what, "--dtype", args.dtype, "--device", args.device,
               "--repeat", str(args.repeat), "--warmup", str(args.warmup),
               *(["--threads", str(args.threads)] if args.threads else [])]
        cases.append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout))
    print(json.dumps({"machine": machine_info(args.device), "cases": cases}, indent=2))


if __name__ == "__main__":
    main()
