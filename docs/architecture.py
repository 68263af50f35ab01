"""Draws docs/img/architecture.png: the three machines, their ports and the traffic.

The picture's source is this file: `python3 docs/architecture.py` redraws it after a change.
"""
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

OUT = Path(__file__).parent / "img" / "architecture.png"
BOXES = [  # (x, y, w, h, title, lines)
    (0.2, 4.3, 2.2, 1.3, "your machine", ["fab (SSH, boto3)", "browser"]),
    (0.2, 1.2, 2.2, 1.3, "AWS APIs", ["EC2, SSM, STS,", "Service Quotas"]),
    (4.2, 4.1, 2.6, 1.7, "front-end  t2.micro",
     ["apache2: the page,", "/predict/ /health -> back-end", "in: 80 world, 22 you"]),
    (8.4, 4.1, 2.6, 1.7, "back-end  t2.micro",
     ["gunicorn + LiteRT :5000", "in: 5000 front-end only,", "22 you (private: via front-end)"]),
    (8.4, 1.0, 2.6, 1.7, "worker  m5.xlarge",
     ["Jupyter on 127.0.0.1 only,", "papermill training", "in: 22 you; stopped after"]),
]
ARROWS = [  # from (x, y), to (x, y), label, colour: edge to edge, so no arrow crosses a box's text
    ((2.4, 5.25), (4.2, 5.25), "HTTP 80: page, /predict/", "tab:blue"),
    ((6.8, 4.95), (8.4, 4.95), "5000, private address", "tab:blue"),
    ((2.4, 4.55), (8.4, 1.85), "SSH 22 to each machine: setup, train,\nthe model relayed by fab (SFTP)", "tab:grey"),
    ((1.3, 4.3), (1.3, 2.5), "HTTPS (boto3)", "tab:grey"),
]


def draw(out=OUT):
    fig, ax = plt.subplots(figsize=(11, 6.2), dpi=110)
    ax.set_xlim(0, 11.4)
    ax.set_ylim(0, 6.6)
    ax.axis("off")
    ax.add_patch(FancyBboxPatch((3.8, 0.5), 7.5, 5.8, boxstyle="round,pad=0.05", fc="#f3f7fb", ec="#7a99b8", ls="--"))
    ax.text(3.95, 6.05, "VPC 192.168.0.0/16, one zone (private mode: back-end in 192.168.1.0/24, NAT gateway)",
            fontsize=9, color="#35557a")
    for x, y, w, h, title, lines in BOXES:
        ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.04", fc="white", ec="#333333"))
        ax.text(x + w / 2, y + h - 0.3, title, ha="center", fontsize=10, weight="bold")
        for i, line in enumerate(lines):
            ax.text(x + w / 2, y + h - 0.65 - 0.32 * i, line, ha="center", fontsize=8.5)
    for (x1, y1), (x2, y2), label, colour in ARROWS:
        ax.add_patch(FancyArrowPatch((x1, y1), (x2, y2), arrowstyle="-|>", mutation_scale=14, color=colour, lw=1.6))
        ax.text((x1 + x2) / 2, (y1 + y2) / 2 + 0.12, label, ha="center", fontsize=8.5, color=colour,
                bbox={"fc": "white", "ec": "none", "alpha": 0.85, "pad": 1})
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, bbox_inches="tight")
    plt.close(fig)
    return out


if __name__ == "__main__":
    print(draw())
