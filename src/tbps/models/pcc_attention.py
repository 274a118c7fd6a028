"""Draw what PCC's part tokens attend to: which image stripes and which words, one row per token.

PCC's K coarse part tokens are shared by both modalities: token k cross-attends to an image's
feature map and to a caption's words, and the two results are trained to match. The picture shows,
for one test pair (an image and one of its captions), per token k: the image with token k's
attention as a heat map (the horizontal stripes of the fine branch outlined, each labelled with its
share of the attention) and the caption with each word shaded by token k's attention to it. This is
how the method is explained to people: part tokens find the same body region in both modalities.

    python -m tbps.models.pcc_attention --checkpoint runs/pcc_synth/last.pt --out docs/pcc_attention.png

Rendering uses matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from tbps.errors import TBPSError

__all__ = ["draw_part_attention", "render_pair", "main"]


def _word_labels(tokenizer, token_ids: Tensor, mask: Tensor) -> list[str]:
    labels = []
    for position, token in enumerate(token_ids.tolist()):
        if not bool(mask[position]):
            break
        if token == tokenizer.sot_id:
            labels.append("[start]")
        elif token == tokenizer.eot_id:
            labels.append("[end]")
        else:
            labels.append(tokenizer.decode([token]) or "?")
    return labels


def draw_part_attention(image: Tensor, words: Sequence[str], image_attention: Tensor, text_attention: Tensor,
                        stripes: Sequence[tuple[int, int]], out: str | Path, title: str = "") -> Path:
    """Write the figure for one pair and return its path.

    ``image``: (3, H, W) in [0, 1]; ``image_attention``: (K, h, w) over the feature map;
    ``text_attention``: (K, len(words)); ``stripes``: the K row ranges of the map.
    """
    from tbps.extras import require

    require("matplotlib", "plots", "the PCC attention figure").use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    parts, rows, _ = image_attention.shape
    height, width = image.shape[1:]
    fig = plt.figure(figsize=(9.0, 0.8 + 1.75 * parts))
    grid = fig.add_gridspec(parts, 2, width_ratios=[1, 3.6], hspace=0.3, wspace=0.08)
    picture = image.permute(1, 2, 0).cpu().numpy()
    scale = height / rows
    for k in range(parts):
        attention = image_attention[k].float()
        heat = F.interpolate(attention[None, None], size=(height, width), mode="bilinear", align_corners=False)[0, 0]
        ax = fig.add_subplot(grid[k, 0])
        ax.imshow(picture)
        ax.imshow(heat.cpu().numpy(), cmap="jet", alpha=0.45)
        total = float(attention.sum()) or 1.0
        shares = [float(attention[start:end].sum()) / total for start, end in stripes]
        best = max(range(len(stripes)), key=lambda i: shares[i])
        for i, (start, end) in enumerate(stripes):
            ax.add_patch(Rectangle((-0.5, start * scale - 0.5), width, (end - start) * scale, fill=False,
                                   edgecolor="white" if i == best else "#bbbbbb", linewidth=2 if i == best else 0.6))
            ax.text(width + 1, (start + end) / 2 * scale, f"{shares[i]:.0%}", fontsize=7, va="center")
        ax.set_xticks([]), ax.set_yticks([])
        ax.set_ylabel(f"part token {k + 1}", fontsize=9)

        ax = fig.add_subplot(grid[k, 1])
        ax.axis("off")
        weights = text_attention[k].float()
        spread = float(weights.max() - weights.min())
        weights = (weights - weights.min()) / spread if spread > 0 else torch.ones_like(weights)  # contrast within the caption
        x, y, line = 0.0, 0.85, 0.2
        renderer = fig.canvas.get_renderer()
        for word, weight in zip(words, weights.tolist()):
            label = ax.text(x, y, word, fontsize=9, transform=ax.transAxes, va="top",
                            bbox={"facecolor": (1.0, 0.35, 0.0, 0.85 * weight), "edgecolor": "none", "pad": 1.5})
            extent = label.get_window_extent(renderer=renderer).transformed(ax.transAxes.inverted())
            if extent.x1 > 1.0 and x > 0:
                label.remove()
                x, y = 0.0, y - line
                label = ax.text(x, y, word, fontsize=9, transform=ax.transAxes, va="top",
                                bbox={"facecolor": (1.0, 0.35, 0.0, 0.85 * weight), "edgecolor": "none", "pad": 1.5})
                extent = label.get_window_extent(renderer=renderer).transformed(ax.transAxes.inverted())
            x = extent.x1 + 0.012
        top = int(torch.argmax(text_attention[k]))
        ax.set_title(f"strongest stripe {best + 1} ({shares[best]:.0%}); strongest word '{words[top]}'",
                     fontsize=8, loc="left")
    if title:
        fig.suptitle(textwrap.fill(title, 110), fontsize=9)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out


def render_pair(model, tokenizer, image: Tensor, caption: str, out: str | Path, display_image: Tensor | None = None,
                title: str = "") -> Path:
    """Run ``model.part_attention`` on one (normalised image, caption) pair and draw it."""
    from tbps.data.transforms import denormalize

    device = next(model.parameters()).device
    token_ids = tokenizer([caption])
    model.eval()
    maps = model.part_attention(image.unsqueeze(0).to(device), token_ids.to(device))
    mask = maps["mask"][0].cpu()
    words = _word_labels(tokenizer, token_ids[0], mask)
    text_attention = maps["text"][0, :, : len(words)].cpu()
    stripes = [tuple(int(v) for v in row) for row in maps["stripes"].tolist()]
    shown = display_image if display_image is not None else denormalize(image.cpu())
    return draw_part_attention(shown, words, maps["image"][0].cpu(), text_attention, stripes, out, title)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tbps.models.pcc_attention",
        description="Draw which image stripes and which words each of PCC's part tokens attends to, for "
                    "one test image and one of its captions, as a PNG (one row per part token).",
        epilog="example: python -m tbps.models.pcc_attention --checkpoint runs/pcc_synth/last.pt "
               "--out docs/pcc_attention.png",
    )
    parser.add_argument("--checkpoint", required=True, help="a PCC checkpoint (last.pt / best.pt of tbps train)")
    parser.add_argument("--dataset", default=None, help="dataset name (default: the checkpoint's data.dataset)")
    parser.add_argument("--root", default=None, help="dataset folder (default: the checkpoint's data.root)")
    parser.add_argument("--split", default="test", choices=("train", "val", "test"), help="split to draw from")
    parser.add_argument("--index", type=int, default=0, help="which image of the split (default 0)")
    parser.add_argument("--caption", type=int, default=0, help="which of its captions (default 0)")
    parser.add_argument("--out", default="docs/pcc_attention.png", help="PNG to write")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, ... (default cpu)")
    args = parser.parse_args(argv)
    try:
        from tbps.data.datasets import load_dataset
        from tbps.data.images import load_image
        from tbps.data.transforms import build_image_transform
        from tbps.engine.checkpoint import load_model_from_checkpoint

        model, cfg, tokenizer = load_model_from_checkpoint(args.checkpoint, device=args.device)
        if not hasattr(model, "part_attention"):
            raise TBPSError(f"{args.checkpoint}: a {cfg.model.name} checkpoint; this tool draws PCC's part tokens")
        dataset = load_dataset(args.dataset or cfg.data.dataset, args.root or cfg.data.root)
        records = dataset.split(args.split)
        if not 0 <= args.index < len(records):
            raise TBPSError(f"--index {args.index}: the {args.split} split has {len(records)} images")
        record = records[args.index]
        if not 0 <= args.caption < len(record.captions):
            raise TBPSError(f"--caption {args.caption}: image {args.index} has {len(record.captions)} captions")
        picture = load_image(record.image_path)
        image = build_image_transform(cfg.data.image_size, train=False)(picture)
        caption = record.captions[args.caption]
        title = f"{Path(record.image_path).name} (id {record.raw_pid}): \"{caption}\""
        path = render_pair(model, tokenizer, image, caption, args.out, title=title)
    except TBPSError as exc:
        print(f"pcc_attention: error: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
