"""Draw docs/canvas_denoising.png: the canvas of a real generation, pass by pass.

    python docs/make_pictures.py                 # the shipped model, as `make demo` prompts it
    python docs/make_pictures.py --out /tmp/x.png --prompt "import os" --max-new-tokens 32

It runs `DiffusionGemma.stream_generate` with the shipped model (`dgemma-code-tiny`, fp32 on the CPU) exactly
as `dgemma generate --show-canvas --seed 0 --max-new-tokens 64 "def fibonacci(n):"` does, and draws every
denoising pass's argmax draft, one row per pass: accepted positions (the tokens the entropy bound took this
pass) on green, the rest on grey, then the committed canvas. Needs Pillow and matplotlib (for its DejaVu Sans
Mono font): `pip install -e ".[train]"`.
"""

from __future__ import annotations

import argparse
import unicodedata
from pathlib import Path

from matplotlib import font_manager
from PIL import Image, ImageDraw, ImageFont

import dgemma
from dgemma import CanvasCommit, DenoiseStep

HERE = Path(__file__).resolve().parent
FONT_SIZE, ROW, PAD, GAP = 13, 19, 12, 2
LABEL_COLUMNS = 26  # the "canvas 0  pass 16  20/32" label before each row
COLORS = {"bg": "#ffffff", "text": "#1f2328", "dim": "#6e7781", "accepted": "#aceebb", "pending": "#eaeef2",
          "commit": "#b6e3ff", "rule": "#d0d7de"}
VISIBLE = {"\n": "↵", "\t": "→", " ": "·"}


def visible(piece: str) -> str:
    """A token's text as one printable run (spaces shown as middle dots, line breaks as arrows)."""
    out = "".join(VISIBLE.get(ch, "·" if unicodedata.category(ch) in ("Cc", "Cf") else ch) for ch in piece)
    return out or "∅"


def record(prompt: str, max_new_tokens: int, seed: int) -> tuple[list[DenoiseStep | CanvasCommit], object]:
    """The events of one generation, as `dgemma generate --seed` runs it (its stop tokens included)."""
    model = dgemma.DiffusionGemma.from_pretrained("dgemma-code-tiny")
    tok = model.tokenizer
    stop = list(dict.fromkeys([*(model.generation_config.eos_token_id or []), *tok.stop_ids]))
    events = [e for e in model.stream_generate([tok.encode(prompt)], seed=seed, max_new_tokens=max_new_tokens,
                                               eos_token_id=stop)
              if isinstance(e, (DenoiseStep, CanvasCommit))]
    return events, tok


def draw(events: list[DenoiseStep | CanvasCommit], tok, prompt: str, out: Path) -> None:
    font = ImageFont.truetype(font_manager.findfont(font_manager.FontProperties(family="DejaVu Sans Mono")),
                              FONT_SIZE)
    char_w = font.getlength("M")
    pieces = {}

    def piece(t: int) -> str:
        if t not in pieces:
            pieces[t] = visible(tok.decode([t], skip_special_tokens=False))
        return pieces[t]

    rows: list[tuple[str, list[str], list[bool] | None]] = []  # (label, cells, accepted or None for a commit)
    for e in events:
        if isinstance(e, DenoiseStep):
            acc = e.accepted[0].tolist()
            rows.append((f"canvas {e.canvas_index}  pass {e.step:>2}  {sum(acc):>2}/{len(acc)}",
                         [piece(t) for t in e.draft[0].tolist()], acc))
        else:
            rows.append((f"canvas {e.canvas_index}  committed", [piece(t) for t in e.tokens[0].tolist()], None))
    x0 = PAD + LABEL_COLUMNS * char_w
    width = max(x0 + sum(font.getlength(c) + 6 + GAP for c in cells) for _, cells, _ in rows) + PAD
    title = f"prompt: {prompt!r}  (dgemma-code-tiny, seed 0)   green: accepted this pass   blue: committed"
    width = max(width, 2 * PAD + font.getlength(title))
    height = PAD + 2 * ROW + len(rows) * ROW + sum(1 for r in rows if r[2] is None) * ROW // 2 + PAD
    image = Image.new("RGB", (int(width), int(height)), COLORS["bg"])
    pen = ImageDraw.Draw(image)
    pen.text((PAD, PAD), title, font=font, fill=COLORS["dim"])
    y = PAD + 2 * ROW
    for label, cells, accepted in rows:
        pen.text((PAD, y + 2), label, font=font, fill=COLORS["dim"])
        x = x0
        for i, cell in enumerate(cells):
            w = font.getlength(cell) + 6
            fill = COLORS["commit"] if accepted is None else COLORS["accepted" if accepted[i] else "pending"]
            pen.rounded_rectangle((x, y, x + w, y + ROW - 3), radius=3, fill=fill)
            pen.text((x + 3, y + 1), cell, font=font, fill=COLORS["text"])
            x += w + GAP
        y += ROW
        if accepted is None:  # a rule between canvases
            pen.line((PAD, y + ROW // 4 - 1, width - PAD, y + ROW // 4 - 1), fill=COLORS["rule"])
            y += ROW // 2
    image = image.quantize(colors=32, dither=Image.Dither.NONE)  # a handful of flat colors: a small PNG
    image.save(out, optimize=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prompt", default="def fibonacci(n):")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=HERE / "canvas_denoising.png")
    args = p.parse_args()
    events, tok = record(args.prompt, args.max_new_tokens, args.seed)
    draw(events, tok, args.prompt, args.out)
    print(f"{args.out}: {args.out.stat().st_size} bytes")


if __name__ == "__main__":
    main()
