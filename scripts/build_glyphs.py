"""Build the embedded "glyphs" benchmark: one class per CJK character, one image per font.

Why: no DML benchmark is reachable offline, so the package ships its own small, fine-grained, many-class
retrieval set. The same character drawn by ~60 different Japanese, Chinese and Korean fonts (Gothic,
Mincho, Kai, brush, cursive, handwriting, pixel and display faces) is a DML problem like Omniglot: the
model must see through the style to the character, and train and test characters are disjoint.

What it writes (``training/glyphs/`` by default, replaced atomically as a whole folder):

- ``train.parquet`` and ``test.parquet``: columns ``image`` (``datasets.Image``: struct {bytes, path},
  80x80 grayscale PNG, glyph fitted into the central 64x64 box, black on white, 16 grey levels),
  ``label`` (``datasets.ClassLabel``, names ``"U+8A9E 語"``, shared by both splits) and ``font``
  (string). Train and test hold disjoint halves of the classes (seeded shuffle).
- ``manifest.json``: sha256 and row counts of both files, classes per split, fonts, build settings.

Characters: the 3142 CJK ideographs that JIS X 0208, GB 2312 and Big5 all encode, i.e. that Japanese,
simplified- and traditional-Chinese fonts all draw. ``--num-classes`` of them are kept (default 1000),
those with the closest look-alike first (土/士, 未/末, 戌/戍, 雪/雷, ...: cosine of 32x32 renderings by Noto
Sans CJK JP), skipping any with fewer than ``--min-fonts`` usable fonts; ``--select random`` takes a
seeded random sample instead (zero-shot Recall@1 is then higher: raw pixels 0.84 instead of 0.77).

Per character and font, a rendering is left out when the font's cmap lacks the character, when the
glyph is shared with another candidate character (a placeholder such as Smiley Sans's smiley), when it
is empty, equals the font's .notdef rendering, or FreeType fails on it; and when it is a near-duplicate
(soft-Jaccard ink distance < ``--dedup-threshold``) of a rendering by a font earlier in ``FONT_FACES``
(many fonts share glyph sources: IPA/Takao, Arphic/cwTeX, ...). Of the rest, at most
``--fonts-per-class`` fonts are kept per class (seeded sample per character), which keeps the repo
data under 30 MB while every font appears across the set.

Rebuild (as root, Debian/Ubuntu)::

    apt-get install --no-install-recommends $(python scripts/build_glyphs.py --print-packages)
    python scripts/build_glyphs.py            # ~3 min on one core; then commit training/glyphs/

The output is deterministic for a given Pillow/FreeType/zlib (sorted inputs, fixed seeds); the manifest
records those versions. A different FreeType may change pixels and hence the hashes: rebuild and
commit the new manifest together with the parquet files.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from fontTools.ttLib import TTFont
from PIL import Image, ImageDraw, ImageFont
from PIL import features as pil_features
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _embedded_build, also when loaded by file path
from _embedded_build import base_parser, publish, split_summary, staging_folder, write_split  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "training" / "data" / "glyphs_data"
FONT_ROOT = Path("/usr/share/fonts")


@dataclass(frozen=True)
class FontFace:
    """One face used as one "font": Debian package, file under /usr/share/fonts, TTC index, label."""

    package: str
    path: str
    index: int
    name: str


_T, _O = "truetype/", "opentype/"
# Curated: one to three clearly different faces per family; derivative families whose ideographs are
# copies of another (Takao, IPA P-fonts, IPAmj, migmix, umeplus, komatuna, monapo, VL Gothic, MMCedar,
# Arphic bsmi/bkai/gkai, cwTeX Kai, Un Dotum, Misaki Mincho) are left out after measuring their
# rendered distance. Earlier entries win the per-character near-duplicate check.
FONT_FACES: tuple[FontFace, ...] = (
    FontFace("fonts-noto-cjk-extra", _O + "noto/NotoSansCJK-Thin.ttc", 0, "Noto Sans CJK JP Thin"),
    FontFace("fonts-noto-cjk", _O + "noto/NotoSansCJK-Regular.ttc", 0, "Noto Sans CJK JP Regular"),
    FontFace("fonts-noto-cjk-extra", _O + "noto/NotoSansCJK-Black.ttc", 0, "Noto Sans CJK JP Black"),
    FontFace("fonts-noto-cjk-extra", _O + "noto/NotoSerifCJK-ExtraLight.ttc", 0, "Noto Serif CJK JP ExtraLight"),
    FontFace("fonts-noto-cjk-extra", _O + "noto/NotoSerifCJK-Black.ttc", 0, "Noto Serif CJK JP Black"),
    FontFace("fonts-ipaexfont-gothic", _O + "ipaexfont-gothic/ipaexg.ttf", 0, "IPAexGothic"),
    FontFace("fonts-ipaexfont-mincho", _O + "ipaexfont-mincho/ipaexm.ttf", 0, "IPAexMincho"),
    FontFace("fonts-mplus", _O + "mplus/Mplus1-Thin.otf", 0, "M PLUS 1 Thin"),
    FontFace("fonts-mplus", _O + "mplus/Mplus1-Regular.otf", 0, "M PLUS 1 Regular"),
    FontFace("fonts-mplus", _O + "mplus/Mplus1-Black.otf", 0, "M PLUS 1 Black"),
    FontFace("fonts-morisawa-bizud-gothic", _T + "bizud-gothic/BIZUDGothic-Bold.ttf", 0, "BIZ UDGothic Bold"),
    FontFace("fonts-morisawa-bizud-mincho", _T + "bizud-mincho/BIZUDMincho-Regular.ttf", 0, "BIZ UDMincho"),
    FontFace("fonts-sawarabi-gothic", _T + "sawarabi-gothic/sawarabi-gothic-medium.ttf", 0, "Sawarabi Gothic"),
    FontFace("fonts-sawarabi-mincho", _T + "sawarabi-mincho/sawarabi-mincho-medium.ttf", 0, "Sawarabi Mincho"),
    FontFace("fonts-horai-umefont", _T + "horai-umefont/ume-tgo4.ttf", 0, "Ume Gothic"),
    FontFace("fonts-horai-umefont", _T + "horai-umefont/ume-tmo3.ttf", 0, "Ume Mincho"),
    FontFace("fonts-konatu", _T + "konatu/Konatu.ttf", 0, "Konatu"),
    FontFace("fonts-motoya-l-cedar", _T + "motoya-l-cedar/MTLc3m.ttf", 0, "Motoya L Cedar"),
    FontFace("fonts-mona", _T + "mona/mona.ttf", 0, "Mona"),
    FontFace("fonts-dotgothic16", _T + "dotgothic16/DotGothic16-Regular.ttf", 0, "DotGothic16"),
    FontFace("fonts-misaki", _T + "misaki/misaki_gothic.ttf", 0, "Misaki Gothic"),
    FontFace("fonts-reggae", _T + "reggae/ReggaeOne-Regular.ttf", 0, "Reggae One"),
    FontFace("fonts-train", _T + "train/TrainOne-Regular.ttf", 0, "Train One"),
    FontFace("fonts-hanazono", _T + "hanazono/HanaMinA.ttf", 0, "Hanazono Mincho A"),
    FontFace("fonts-dejima-mincho", _T + "dejima-mincho/dejima-mincho-r227.ttf", 0, "Dejima Mincho"),
    FontFace("fonts-oradano-mincho-gsrr", _T + "oradano-mincho/OradanoGSRR.ttf", 0, "Oradano Mincho GSRR"),
    FontFace("fonts-kiloji", _T + "kiloji/kiloji.ttf", 0, "Kiloji"),
    FontFace("fonts-kiloji", _T + "kiloji/kiloji_b.ttf", 0, "Kiloji B"),
    FontFace("fonts-seto", _T + "seto/setofont.ttf", 0, "Seto Font"),
    FontFace("fonts-yozvox-yozfont", _T + "yozvox-yozfont/YOzRN_.ttf", 0, "YOzFont N"),
    FontFace("fonts-kouzan-mouhitsu", _T + "kouzan-mouhitsu/kouzan-mouhitsu.ttf", 0, "Kouzan Mouhitsu"),
    FontFace("fonts-kouzan-mouhitsu", _T + "kouzan-mouhitsu/kouzan-mouhitsu-gyosho.ttf", 0, "Kouzan Gyosho"),
    FontFace("fonts-kouzan-mouhitsu", _T + "kouzan-mouhitsu/KouzanBrushFontSousyo.ttf", 0, "Kouzan Sousyo"),
    FontFace("fonts-aoyagi-kouzan-t", _T + "aoyagi-kouzan-t/AoyagiKouzanT.ttf", 0, "Aoyagi Kouzan T"),
    FontFace("fonts-aoyagi-soseki", _T + "aoyagi-soseki/aoyagi-soseki.ttf", 0, "Aoyagi Soseki"),
    FontFace("fonts-arphic-uming", _T + "arphic/uming.ttc", 0, "AR PL UMing CN"),
    FontFace("fonts-arphic-ukai", _T + "arphic/ukai.ttc", 0, "AR PL UKai CN"),
    FontFace("fonts-arphic-gbsn00lp", _T + "arphic-gbsn00lp/gbsn00lp.ttf", 0, "AR PL SungtiL GB"),
    FontFace("fonts-cns11643-kai", _T + "cns11643/TW-Kai-98_1.ttf", 0, "TW-Kai"),
    FontFace("fonts-cns11643-sung", _T + "cns11643/TW-Sung-98_1.ttf", 0, "TW-Sung"),
    FontFace("fonts-cwtex-fs", _T + "cwtex/cwfs.ttf", 0, "cwTeX FangSong"),
    FontFace("fonts-cwtex-heib", _T + "cwtex/cwheib.ttf", 0, "cwTeX HeiBold"),
    FontFace("fonts-cwtex-ming", _T + "cwtex/cwming.ttf", 0, "cwTeX Ming"),
    FontFace("fonts-cwtex-yen", _T + "cwtex/cwyen.ttf", 0, "cwTeX Yen"),
    FontFace("fonts-lxgw-wenkai", _T + "lxgw-wenkai/LXGWWenKai-Light.ttf", 0, "LXGW WenKai Light"),
    FontFace("fonts-lxgw-wenkai", _T + "lxgw-wenkai/LXGWWenKai-Bold.ttf", 0, "LXGW WenKai Bold"),
    FontFace("fonts-wqy-zenhei", _T + "wqy/wqy-zenhei.ttc", 0, "WenQuanYi Zen Hei"),
    FontFace("fonts-wqy-microhei", _T + "wqy/wqy-microhei.ttc", 0, "WenQuanYi Micro Hei"),
    FontFace("fonts-smiley-sans", _T + "smiley-sans/SmileySans-Oblique.ttf", 0, "Smiley Sans Oblique"),
    FontFace("fonts-baekmuk", _T + "baekmuk/batang.ttf", 0, "Baekmuk Batang"),
    FontFace("fonts-baekmuk", _T + "baekmuk/dotum.ttf", 0, "Baekmuk Dotum"),
    FontFace("fonts-baekmuk", _T + "baekmuk/gulim.ttf", 0, "Baekmuk Gulim"),
    FontFace("fonts-unfonts-core", _T + "unfonts-core/UnBatang.ttf", 0, "Un Batang"),
    FontFace("fonts-unfonts-core", _T + "unfonts-core/UnGungseo.ttf", 0, "Un Gungseo"),
    FontFace("fonts-unfonts-extra", _T + "unfonts-extra/UnShinmun.ttf", 0, "Un Shinmun"),
    FontFace("fonts-unfonts-extra", _T + "unfonts-extra/UnYetgul.ttf", 0, "Un Yetgul"),
    FontFace("fonts-nanum", _T + "nanum/NanumMyeongjo-YetHangul.ttf", 0, "NanumMyeongjo YetHangul"),
    FontFace("fonts-nanum", _T + "nanum/NanumGothic.ttf", 0, "NanumGothic"),
    FontFace("fonts-nanum", _T + "nanum/NanumBarunGothic.ttf", 0, "NanumBarunGothic"),
    FontFace("fonts-nanum", _T + "nanum/NanumGothicExtraBold.ttf", 0, "NanumGothic ExtraBold"),
)

IMAGE_SIZE = 80  # stored size: room for a random-resized crop to 64
GLYPH_BOX = 64  # the glyph's longer side is fitted to this, centred
RENDER_EM = 128  # font size of the high-resolution rendering that is then downsampled
GREY_LEVELS = 16  # quantisation: halves the PNG size, invisible on anti-aliased strokes
REFERENCE_FACE = 1  # Noto Sans CJK JP Regular: draws every candidate, the look-alike ranking uses it
MISSING_CODEPOINT = 0x10FFFD  # private use, plane 16: no font here maps it, so it draws .notdef


def candidate_characters() -> list[str]:
    """The ideographs that JIS X 0208, GB 2312 and Big5 all encode (3142), by codepoint.

    Computed with Python's codecs (no download): a character qualifies when EUC-JP, EUC-CN (GB 2312) and
    Big5 each encode it in two bytes. These are characters that Japanese, simplified-Chinese and
    traditional-Chinese fonts all draw, so each class gets many fonts.
    """

    def encodes(ch: str, codec: str) -> bool:
        try:
            return len(ch.encode(codec)) == 2
        except UnicodeEncodeError:
            return False

    return [
        ch
        for ch in map(chr, range(0x4E00, 0xA000))
        if encodes(ch, "euc_jp") and encodes(ch, "gb2312") and encodes(ch, "big5")
    ]


def confusable_order(chars: list[str], reference: LoadedFace) -> list[str]:
    """``chars`` sorted by how close their nearest other character looks, closest first.

    Why: a random subset holds few look-alikes, so even raw pixels retrieve well. Preferring characters
    that have a near twin (土/士, 未/末, 戌/戍, 雪/雷, ...) makes the benchmark fine-grained. Similarity is
    the cosine of 32x32 ink maps drawn by one reference font; ties go by codepoint.
    """
    drawn = [(ch, ink) for ch in chars if (ink := reference.render(ch)) is not None]
    small = np.stack(
        [np.asarray(Image.fromarray(ink, mode="F").resize((32, 32), Image.Resampling.BOX)).ravel() for _, ink in drawn]
    )
    small /= np.linalg.norm(small, axis=1, keepdims=True)
    sims = small @ small.T
    np.fill_diagonal(sims, -1.0)
    nearest = sims.max(axis=1)
    ranked = sorted(range(len(drawn)), key=lambda i: (-round(float(nearest[i]), 6), ord(drawn[i][0])))
    drawn_set = {ch for ch, _ in drawn}
    return [drawn[i][0] for i in ranked] + [ch for ch in chars if ch not in drawn_set]


def class_name(ch: str) -> str:
    """ClassLabel name of a character, e.g. ``"U+8A9E 語"``: readable in logs, unambiguous."""
    return f"U+{ord(ch):04X} {ch}"


def render_glyph(font: ImageFont.FreeTypeFont, ch: str) -> np.ndarray | None:
    """Ink coverage (float32 in [0, 1], IMAGE_SIZE square) of ``ch`` fitted and centred; None if empty."""
    canvas = Image.new("L", (RENDER_EM * 3, RENDER_EM * 3), 0)
    ImageDraw.Draw(canvas).text((RENDER_EM, RENDER_EM), ch, fill=255, font=font)
    bbox = canvas.getbbox()
    if bbox is None:
        return None
    glyph = canvas.crop(bbox)
    scale = GLYPH_BOX / max(glyph.size)
    w, h = (max(1, round(side * scale)) for side in glyph.size)
    glyph = glyph.resize((w, h), Image.Resampling.LANCZOS)
    out = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    out.paste(glyph, ((IMAGE_SIZE - w) // 2, (IMAGE_SIZE - h) // 2))
    return np.asarray(out, dtype=np.float32) / 255.0


def ink_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Soft Jaccard distance of two ink maps: 0 for identical drawings, 1 for disjoint ones."""
    union = np.maximum(a, b).sum()
    return float(np.abs(a - b).sum() / union) if union > 0 else 0.0


def encode_png(ink: np.ndarray) -> bytes:
    """Black-on-white 8-bit grayscale PNG with GREY_LEVELS levels (deterministic zlib settings)."""
    levels = np.round(ink * (GREY_LEVELS - 1))
    pixels = (255 - levels * 255 // (GREY_LEVELS - 1)).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buf, format="PNG", optimize=True)
    return buf.getvalue()


class LoadedFace:
    """A font face opened for rendering, with its cmap-based coverage of the candidate characters."""

    def __init__(self, face: FontFace, chars: list[str]):
        path = FONT_ROOT / face.path
        self.face = face
        # BASIC layout: one glyph per character needs no shaping, and the result then does not depend on
        # whether Pillow was built with libraqm.
        self.font = ImageFont.truetype(str(path), RENDER_EM, index=face.index, layout_engine=ImageFont.Layout.BASIC)
        cmap = TTFont(str(path), fontNumber=face.index, lazy=True).getBestCmap() or {}
        glyph_of = {ch: cmap.get(ord(ch)) for ch in chars}
        uses: dict[str, int] = {}
        for glyph in glyph_of.values():
            if glyph is not None:
                uses[glyph] = uses.get(glyph, 0) + 1
        # A glyph shared by two different common ideographs is a placeholder (e.g. Smiley Sans's smiley).
        self.covers = {ch for ch, glyph in glyph_of.items() if glyph is not None and uses[glyph] == 1}
        self.notdef = self._render(chr(MISSING_CODEPOINT))

    def _render(self, ch: str) -> np.ndarray | None:
        try:
            return render_glyph(self.font, ch)
        except OSError:  # FreeType hinting errors ("invalid opcode") in a few fonts
            return None

    def render(self, ch: str) -> np.ndarray | None:
        """The fitted ink map of ``ch``, or None when this face does not really draw it."""
        if ch not in self.covers:
            return None
        ink = self._render(ch)
        if ink is None or ink.max() < 0.5:
            return None
        if self.notdef is not None and ink_distance(ink, self.notdef) < 1e-3:
            return None
        return ink


def check_fonts_installed(faces: tuple[FontFace, ...]) -> None:
    """Fail before any work, naming the Debian packages to install, if a font file is missing."""
    missing = sorted({f.package for f in faces if not (FONT_ROOT / f.path).is_file()})
    if missing:
        sys.exit(
            f"Font files missing under {FONT_ROOT}. Install them (as root):\n"
            f"  apt-get install --no-install-recommends {' '.join(missing)}"
        )


def build(args: argparse.Namespace) -> dict:
    """Render, filter and split; write the folder atomically; return the manifest."""
    check_fonts_installed(FONT_FACES)
    chars = candidate_characters()
    if args.num_classes > len(chars) or args.num_classes < 2 or args.num_classes % 2:
        sys.exit(f"--num-classes {args.num_classes}: must be even and between 2 and {len(chars)}.")
    faces = [LoadedFace(f, chars) for f in tqdm(FONT_FACES, desc="opening fonts", unit="font")]

    # Take characters in order (most confusable first, or seeded random) until enough classes qualify.
    if args.select == "confusable":
        order = confusable_order(chars, faces[REFERENCE_FACE])
    else:
        order = sorted(chars)
        random.Random(args.seed).shuffle(order)
    kept: dict[str, list[tuple[int, bytes]]] = {}  # character -> (face id, PNG) per chosen font
    stats = {"rendered": 0, "not_drawn": 0, "near_duplicate": 0, "too_few_fonts": 0}
    bar = tqdm(total=args.num_classes, desc="rendering classes", unit="class")
    for ch in order:
        if len(kept) == args.num_classes:
            break
        accepted: list[tuple[int, np.ndarray]] = []
        for face_id, face in enumerate(faces):
            ink = face.render(ch)
            if ink is None:
                stats["not_drawn"] += 1
                continue
            stats["rendered"] += 1
            if any(ink_distance(ink, other) < args.dedup_threshold for _, other in accepted):
                stats["near_duplicate"] += 1
                continue
            accepted.append((face_id, ink))
        if len(accepted) < args.min_fonts:
            stats["too_few_fonts"] += 1
            continue
        rng = random.Random(f"{args.seed}-{ord(ch)}")
        chosen = sorted(rng.sample(range(len(accepted)), min(args.fonts_per_class, len(accepted))))
        kept[ch] = [(accepted[i][0], encode_png(accepted[i][1])) for i in chosen]
        bar.update(1)
    bar.close()
    if len(kept) < args.num_classes:
        sys.exit(f"Only {len(kept)} characters have >= {args.min_fonts} fonts; lower --num-classes.")

    names = [class_name(ch) for ch in sorted(kept)]
    label_of = {ch: i for i, ch in enumerate(sorted(kept))}
    class_order = sorted(kept)
    random.Random(args.seed).shuffle(class_order)
    half = len(class_order) // 2
    split_chars = {"train": sorted(class_order[:half]), "test": sorted(class_order[half:])}

    import datasets  # imported late: only needed once rendering succeeded

    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=names), "font": datasets.Value("string")}
    )
    out_dir = Path(args.out).resolve()
    manifest: dict = {
        "description": "CJK characters drawn by many fonts; class-disjoint train/test. "
        "Built by scripts/build_glyphs.py.",
        "image_size": IMAGE_SIZE,
        "glyph_box": GLYPH_BOX,
        "grey_levels": GREY_LEVELS,
        "seed": args.seed,
        "class_selection": args.select,
        "min_fonts_per_class": args.min_fonts,
        "max_fonts_per_class": args.fonts_per_class,
        "dedup_threshold": args.dedup_threshold,
        "num_classes": len(names),
        "fonts": [f.name for f in FONT_FACES],
        "debian_packages": sorted({f.package for f in FONT_FACES}),
        "filter_counts": stats,
        "versions": {
            "pillow": Image.__version__,
            "freetype": pil_features.version("freetype2"),
            "datasets": datasets.__version__,
        },
        "splits": {},
    }
    with staging_folder(out_dir, ".glyphs-build-") as tmp_dir:
        for split, split_list in split_chars.items():
            rows = {"image": [], "label": [], "font": []}
            for ch in split_list:
                for face_id, png in kept[ch]:
                    rows["image"].append({"bytes": png, "path": None})
                    rows["label"].append(label_of[ch])
                    rows["font"].append(FONT_FACES[face_id].name)
            per_class = [len(kept[ch]) for ch in split_list]
            manifest["splits"][split] = {
                **write_split(tmp_dir, split, rows, features, size=True),
                "num_classes": len(split_list),
                "min_images_per_class": min(per_class),
                "max_images_per_class": max(per_class),
            }
        publish(tmp_dir, out_dir, manifest)
    return manifest


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = base_parser(__doc__, DEFAULT_OUT, 1000, "characters to keep (even; half train)", "Debian font packages")
    parser.add_argument("--fonts-per-class", type=int, default=24, help="at most this many fonts per character")
    parser.add_argument("--min-fonts", type=int, default=15, help="drop characters with fewer usable fonts")
    parser.add_argument(
        "--dedup-threshold", type=float, default=0.15,
        help="ink distance below which two renderings of a character count as the same drawing",
    )  # fmt: skip
    parser.add_argument(
        "--select", choices=("confusable", "random"), default="confusable",
        help="which characters to keep: those with the closest look-alikes, or a seeded sample",
    )  # fmt: skip
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.getLogger("fontTools").setLevel(logging.ERROR)  # malformed 'post' tables only warn
    if args.print_packages:
        print(" ".join(sorted({f.package for f in FONT_FACES})))
        return
    manifest = build(args)
    summary = {"out": str(args.out), "filter_counts": manifest["filter_counts"], "splits": split_summary(manifest)}
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
