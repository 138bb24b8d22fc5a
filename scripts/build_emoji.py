"""Build the "emoji" development benchmark: one class per emoji, one image per open-licensed emoji design.

Why: a second small, offline benchmark from another domain than the CJK glyphs, for tuning the
fine-tuning recipe. The same emoji ("dog face", "red apple", "bicycle") drawn by independent designs
(Google Noto, Noto's older "blob" era, Twitter Twemoji, OpenMoji, Microsoft Fluent flat and high-contrast,
EmojiOne 1 and 2, EmojiOne monotone, Firefox OS) is a retrieval problem of objects in varied styles,
closer to natural images than the glyphs: ImageNet features beat raw pixels zero-shot here
(``scripts/zero_shot.py --dataset emoji``), while the glyphs favour raw pixels. Train and test
hold disjoint halves of the emoji. Freedesktop icon themes are deliberately not used (they are kept for
an independent check).

Sources: the Iconify JSON packages of the npm registry (SVG bodies + license per set), pinned in
``PACKAGES`` below; each set's license is recorded in the manifest. No Apple, Facebook or Samsung art.

What it writes (``data/emoji_data/`` by default, replaced atomically as a whole folder):

- ``train.parquet`` and ``test.parquet``: columns ``image`` (``datasets.Image``: 80x80 RGB lossless WebP, the
  SVG's full view box rendered at 76x76 by resvg onto white and centred on a white 80x80 canvas),
  ``label`` (``datasets.ClassLabel`` shared by both splits, names like ``"U+1F436 dog-face"``) and
  ``design`` (the Iconify set, e.g. ``"noto"``).
- ``manifest.json``: sha256 and counts of both files, the designs with package versions and licenses,
  build settings and the versions of the tools that draw the pixels.

Classes: emoji keyed by their code point sequence (U+FE0F dropped). Sets that ship ``chars.json``
map code points to icon names; the others are matched through those names (exact, or with hyphens
removed for Firefox OS's squashed names, when unambiguous). Left out: skin-tone variants, gendered
ZWJ variants (``man-``/``woman-`` and ``♂``/``♀`` sequences; the neutral person stays), flags, keycaps,
tags and code points below U+2000 (digits, ©, ®). Per class, a rendition is dropped when it is a
near-duplicate of an earlier design's rendition of the same emoji (designs derived from each other:
Noto vs Noto v1 objects, EmojiOne 2 vs its monotone, ...), or when, within its design, it is near-identical to
another emoji's rendition (colour swatches, clock faces drawn alike, ...). Emoji with fewer than
``--min-designs`` renditions left are dropped; ``--num-classes`` are sampled (seeded), then at most
``--max-designs`` renditions per class (seeded).

Zero-shot on the test split (``scripts/zero_shot.py --dataset emoji``, 400 emoji, 3144 images, CPU):
Recall@1 / MAP@R raw pixels 0.365 / 0.120; ImageNet lite0 at 64 px 0.368 / 0.144, at 80 px 0.417 / 0.170.
With the view box at 64 px instead of 76 (more white margin), lite0 at 64 px fell below raw pixels on
Recall@1 (0.353 vs 0.366), hence ``BOX = 76``.

Rebuild (~35 s on one core)::

    mkdir -p /tmp/emoji_npm && cd /tmp/emoji_npm && npm init -y >/dev/null
    npm install $(python /path/to/repo/scripts/build_emoji.py --print-packages)
    pip install resvg-py==0.5.0
    python /path/to/repo/scripts/build_emoji.py --npm-dir /tmp/emoji_npm   # then commit data/emoji_data/

The output is deterministic for the pinned packages, resvg-py, Pillow and libwebp (sorted inputs, fixed
seeds); the manifest records those versions.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import random
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
from PIL import Image
from PIL import features as pil_features
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _embedded_build, also when loaded by file path
from _embedded_build import base_parser, publish, split_summary, staging_folder, write_split  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "training" / "data" / "emoji_data"
logger = logging.getLogger("build_emoji")


@dataclass(frozen=True)
class Design:
    """One Iconify emoji set used as one design: npm package, pinned version, short name."""

    name: str
    version: str
    description: str

    @property
    def package(self) -> str:
        return f"@iconify-json/{self.name}"


# Order matters: earlier designs win the per-class near-duplicate check, and name -> code point maps
# are taken from the sets with chars.json in this order. Fluent's "colour" style (@iconify-json/fluent-emoji)
# is left out: it is the flat drawing with gradient shading, near-identical at 64 px.
PACKAGES = (
    Design("noto", "1.2.9", "Google Noto Color Emoji (current)"),
    Design("twemoji", "1.2.5", "Twitter Twemoji"),
    Design("openmoji", "1.2.29", "OpenMoji (colour)"),
    Design("fluent-emoji-flat", "1.2.6", "Microsoft Fluent Emoji, flat style"),
    Design("fluent-emoji-high-contrast", "1.2.6", "Microsoft Fluent Emoji, high-contrast (monochrome)"),
    Design("noto-v1", "1.2.5", "Google Noto Emoji v1 (the Android 7 'blob' era)"),
    Design("emojione", "1.2.3", "EmojiOne 2"),
    Design("emojione-v1", "1.2.3", "EmojiOne 1"),
    Design("emojione-monotone", "1.2.1", "EmojiOne 2 monotone"),
    Design("fxemoji", "1.2.2", "Firefox OS emoji"),
)

IMAGE_SIZE = 80
BOX = 76  # the view box fills most of the canvas: ImageNet features need the object large
SKIN_TONES = {0x1F3FB, 0x1F3FC, 0x1F3FD, 0x1F3FE, 0x1F3FF}
GENDERED = {0x2640, 0x2642, 0x1F468, 0x1F469, 0x1F466, 0x1F467}  # ♀ ♂ man woman boy girl
ZWJ, VS16, KEYCAP = 0x200D, 0xFE0F, 0x20E3


def parse_key(key: str) -> tuple[int, ...]:
    return tuple(int(part, 16) for part in key.split("-") if int(part, 16) != VS16)


def eligible(cps: tuple[int, ...]) -> bool:
    """A standalone, gender- and skin-tone-neutral emoji that is not a flag, keycap or tag sequence."""
    if not cps or cps[0] < 0x2000:
        return False
    if any(c in SKIN_TONES or c == KEYCAP or 0x1F1E6 <= c <= 0x1F1FF or 0xE0000 <= c <= 0xE007F for c in cps):
        return False
    if ZWJ in cps and any(c in GENDERED for c in cps):
        return False
    if cps[0] in (0x1F3F3, 0x1F3F4) and len(cps) > 1:  # rainbow, pirate, transgender flags
        return False
    return True


def class_name(cps: tuple[int, ...], name: str) -> str:
    return f"{'-'.join(f'U+{c:04X}' for c in cps)} {name}"


def load_set(npm_dir: Path, design: Design) -> dict:
    folder = npm_dir / "node_modules" / design.package
    version = json.loads((folder / "package.json").read_text())["version"]
    if version != design.version:
        raise SystemExit(f"{design.package} is {version}, the build pins {design.version}: install the pinned one.")
    icons = json.loads((folder / "icons.json").read_text())
    info = json.loads((folder / "info.json").read_text())
    chars_path = folder / "chars.json"
    chars = json.loads(chars_path.read_text()) if chars_path.is_file() else {}
    return {"icons": icons, "info": info, "chars": chars}


def resolve(icons: dict, name: str) -> dict | None:
    """The icon's data (body and view box), following plain aliases; None for transformed aliases."""
    for _ in range(5):
        if name in icons["icons"]:
            icon = icons["icons"][name]
            return {
                "body": icon["body"],
                "left": icon.get("left", icons.get("left", 0)),
                "top": icon.get("top", icons.get("top", 0)),
                "width": icon.get("width", icons.get("width", 16)),
                "height": icon.get("height", icons.get("height", 16)),
            }
        alias = icons.get("aliases", {}).get(name)
        if alias is None or set(alias) != {"parent"}:
            return None
        name = alias["parent"]
    return None


def icon_svg(icon: dict) -> str:
    return (
        '<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink" '
        f'viewBox="{icon["left"]} {icon["top"]} {icon["width"]} {icon["height"]}" width="{BOX}" height="{BOX}">'
        f"{icon['body']}</svg>"
    )


def render(svg: str) -> np.ndarray | None:
    """RGB uint8 (IMAGE_SIZE, IMAGE_SIZE, 3): the view box at BOX x BOX on white, centred; None if blank."""
    import resvg_py

    try:
        png = resvg_py.svg_to_bytes(svg_string=svg, width=BOX, height=BOX, background="#ffffff", skip_system_fonts=True)
    except ValueError:
        return None
    tile = Image.open(io.BytesIO(bytes(png))).convert("RGB")
    if tile.size != (BOX, BOX):
        tile = tile.resize((BOX, BOX), Image.Resampling.LANCZOS)
    canvas = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (255, 255, 255))
    offset = (IMAGE_SIZE - BOX) // 2
    canvas.paste(tile, (offset, offset))
    array = np.asarray(canvas)
    if int(array.min()) > 240:  # nothing drawn
        return None
    return array


def signature(array: np.ndarray) -> np.ndarray:
    """Unit vector of the 32x32 RGB image's darkness/colour, for near-duplicate checks."""
    small = np.asarray(Image.fromarray(array).resize((32, 32), Image.Resampling.BILINEAR), dtype=np.float32)
    vec = (255.0 - small).ravel()
    return vec / max(float(np.linalg.norm(vec)), 1e-6)


def encode_webp(array: np.ndarray) -> bytes:
    """Lossless WebP: the same pixels as PNG at about half the size (under 1 kB per image)."""
    buffer = io.BytesIO()
    Image.fromarray(array, mode="RGB").save(buffer, format="WEBP", lossless=True, quality=100, method=4)
    return buffer.getvalue()


def code_points_by_name(sets: dict[str, dict]) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """Icon name -> code points (from every chars.json, first wins), and code points -> display name."""
    by_name: dict[str, tuple[int, ...]] = {}
    display: dict[tuple[int, ...], str] = {}
    for design in PACKAGES:
        for key, name in sorted(sets[design.name]["chars"].items()):
            cps = parse_key(key)
            by_name.setdefault(name, cps)
            display.setdefault(cps, name)
    return by_name, display


def icons_per_class(sets: dict[str, dict]) -> tuple[dict[tuple[int, ...], dict[str, dict]], dict]:
    """For every eligible emoji, the icon data of each design that has it."""
    by_name, display = code_points_by_name(sets)
    squashed: dict[str, set] = {}
    for name, cps in by_name.items():
        squashed.setdefault(name.replace("-", ""), set()).add(cps)
    table: dict[tuple[int, ...], dict[str, dict]] = {}
    for design in PACKAGES:
        data = sets[design.name]
        names: dict[tuple[int, ...], str] = {}
        if data["chars"]:
            for key, name in sorted(data["chars"].items()):
                names.setdefault(parse_key(key), name)
        else:
            for name in sorted(list(data["icons"]["icons"]) + list(data["icons"].get("aliases", {}))):
                cps = by_name.get(name)
                if cps is None:
                    found = squashed.get(name.replace("-", ""), set())
                    cps = next(iter(found)) if len(found) == 1 else None
                if cps is not None:
                    names.setdefault(cps, name)
        for cps, name in names.items():
            if not eligible(cps):
                continue
            icon = resolve(data["icons"], name)
            if icon is not None:
                table.setdefault(cps, {})[design.name] = icon
    return table, display


def build(args: argparse.Namespace) -> dict:
    import datasets

    sets = {d.name: load_set(args.npm_dir, d) for d in PACKAGES}
    table, display = icons_per_class(sets)
    candidates = sorted(cps for cps, icons in table.items() if len(icons) >= args.min_designs and cps in display)
    logger.info("%d eligible emoji with >= %d designs before rendering", len(candidates), args.min_designs)

    order = [d.name for d in PACKAGES]
    rendered: dict[tuple[int, ...], dict[str, np.ndarray]] = {}
    for cps in tqdm(candidates, desc="render", unit="emoji"):
        images = {}
        for name in order:
            if name in table[cps] and (array := render(icon_svg(table[cps][name]))) is not None:
                images[name] = array
        rendered[cps] = images

    # Within a class: drop a rendition too close to an earlier design's (derived designs).
    sigs = {cps: {n: signature(a) for n, a in imgs.items()} for cps, imgs in rendered.items()}
    dropped_same_class = 0
    for cps in candidates:
        kept: list[str] = []
        for name in order:
            if name not in sigs[cps]:
                continue
            if any(float(sigs[cps][name] @ sigs[cps][k]) > 1.0 - args.dedup_threshold for k in kept):
                del rendered[cps][name]
                dropped_same_class += 1
            else:
                kept.append(name)
    # Within a design: drop renditions near-identical to another emoji's rendition in the same design.
    dropped_cross_class = 0
    for name in order:
        members = [cps for cps in candidates if name in rendered[cps]]
        if len(members) < 2:
            continue
        matrix = np.stack([sigs[cps][name] for cps in members])
        sims = matrix @ matrix.T
        np.fill_diagonal(sims, -1.0)
        for i in np.flatnonzero(sims.max(axis=1) > 1.0 - args.confusable_threshold):
            del rendered[members[i]][name]
            dropped_cross_class += 1

    usable = [cps for cps in candidates if len(rendered[cps]) >= args.min_designs]
    rng = random.Random(args.seed)
    chosen = sorted(rng.sample(usable, min(args.num_classes, len(usable))))
    logger.info(
        "dropped %d same-class and %d cross-class near-duplicates; %d usable emoji, %d chosen",
        dropped_same_class,
        dropped_cross_class,
        len(usable),
        len(chosen),
    )
    names = [class_name(cps, display[cps]) for cps in chosen]
    shuffled = list(range(len(chosen)))
    rng.shuffle(shuffled)
    test_ids = set(shuffled[: len(chosen) // 2])
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=names), "design": datasets.Value("string")}
    )
    manifest: dict = {
        "description": "Emoji (classes) drawn by many open-licensed designs (images); class-disjoint train/test. "
        "Built by scripts/build_emoji.py.",
        "image_size": IMAGE_SIZE,
        "render_box": BOX,
        "background": "white",
        "seed": args.seed,
        "min_designs_per_class": args.min_designs,
        "max_designs_per_class": args.max_designs,
        "dedup_threshold": args.dedup_threshold,
        "confusable_threshold": args.confusable_threshold,
        "num_classes": len(chosen),
        "designs": [
            {
                "name": d.name,
                "package": f"{d.package}@{d.version}",
                "description": d.description,
                "license": sets[d.name]["info"].get("license", {}).get("spdx"),
                "license_url": sets[d.name]["info"].get("license", {}).get("url"),
                "author": sets[d.name]["info"].get("author", {}).get("name"),
                "source_url": sets[d.name]["info"].get("author", {}).get("url"),
            }
            for d in PACKAGES
        ],
        "versions": {
            "resvg_py": metadata.version("resvg-py"),
            "pillow": Image.__version__,
            "numpy": np.__version__,
            "datasets": datasets.__version__,
            "libwebp": pil_features.version("webp"),
        },
        "splits": {},
    }
    with staging_folder(args.out.resolve(), ".emoji-") as tmp_dir:
        for split in ("train", "test"):
            rows: dict[str, list] = {"image": [], "label": [], "design": []}
            per_class = []
            for label, cps in enumerate(chosen):
                if (label in test_ids) != (split == "test"):
                    continue
                designs = [n for n in order if n in rendered[cps]]
                if len(designs) > args.max_designs:
                    keep = set(random.Random(f"{args.seed}-{label}").sample(designs, args.max_designs))
                    designs = [n for n in designs if n in keep]
                per_class.append(len(designs))
                for name in designs:
                    rows["image"].append({"bytes": encode_webp(rendered[cps][name]), "path": None})
                    rows["label"].append(label)
                    rows["design"].append(name)
            manifest["splits"][split] = {
                **write_split(tmp_dir, split, rows, features),
                "num_classes": len(per_class),
                "images_per_class": {str(k): per_class.count(k) for k in sorted(set(per_class))},
                "images_per_design": {n: rows["design"].count(n) for n in order},
            }
        publish(tmp_dir, args.out.resolve(), manifest)
    return manifest


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = base_parser(__doc__, DEFAULT_OUT, 800, "emoji to keep (half train)", "npm packages")
    parser.add_argument("--npm-dir", type=Path, default=Path("/tmp/emoji_npm"), help="holds node_modules/@iconify-json")
    parser.add_argument("--min-designs", type=int, default=4)
    parser.add_argument("--max-designs", type=int, default=10)
    parser.add_argument("--dedup-threshold", type=float, default=0.02, help="same-emoji: 1 - cosine below this")
    parser.add_argument("--confusable-threshold", type=float, default=0.005, help="other emoji, same design")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.print_packages:
        print(" ".join(f"{d.package}@{d.version}" for d in PACKAGES))
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    manifest = build(args)
    print(json.dumps(split_summary(manifest), indent=2))


if __name__ == "__main__":
    main()
