#!/usr/bin/env python3
"""Build query/pos/neg JSONL retrieval datasets from real Unix manual pages.

Why man pages: they are real text that nobody on this project wrote, under
free licences, and every page already pairs a one-line summary (the NAME
line) with a longer explanation (the DESCRIPTION section) -- a natural
(query, relevant passage) pair for contrastive retrieval training.

Sources (see datasets/README.md for versions and licences):
  en     Debian packages `manpages` + `manpages-dev` (sections 2, 3, 4, 5, 7),
         read from the installed system (`dpkg -L`).
  zh_tw  Debian package `manpages-zh`, pages under usr/share/man/zh_TW, either
         from an extracted folder (--source dir) or downloaded with
         `apt-get download` and unpacked with `dpkg-deb -x` (--source deb).

Pages are rendered with man-db/groff (`man -l`) rather than parsed as roff,
because real pages use tbl, mdoc, custom macros and many escapes that groff
already knows; a very wide MANWIDTH with hyphenation and justification off
gives one line per paragraph, so "joining wrapped lines" cannot mangle words.

Extra Python dependency: rank_bm25 (hard-negative mining).
Requires the `man` and `groff` programs (Debian: man-db, groff-base).
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

EN_PAGE_RE = re.compile(r"^/usr/share/man/man[23457]/[^/]+\.gz$")
# Per-language limits: positive length kept, min description / query size.
LIMITS = {"en": {"max_chars": 600, "min_desc": 80},
          "zh_tw": {"max_chars": 300, "min_desc": 30}}
# Real headings vary a lot in manpages-zh ("DESCRIPTION 描述", "描述 (DESCRIPTION)",
# "[說明]", "NAME(名稱)", ...), so headings are matched by any of their tokens.
NAME_WORDS = {"NAME", "名稱", "名字", "命令名"}
DESC_WORDS = {"DESCRIPTION", "描述", "描敘", "說明"}
# Used only when no DESCRIPTION-like heading exists: Tcl pages say INTRODUCTION,
# LAPACK pages PURPOSE, svn pages OVERVIEW ("概述" is not here: help2man pages
# translate SYNOPSIS as 概述).
DESC_FALLBACK = {"INTRODUCTION", "介紹", "PURPOSE", "目的", "OVERVIEW"}
HAN = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
CJK = HAN + "\u3000-\u303f\uff00-\uffef"  # Han plus CJK / full-width punctuation
# NAME separator: a dash (ASCII, "--", Unicode dashes/minus, full-width) with
# blanks on both sides, else on one side ("write -在一個..."); never none, so
# names like "ld-linux.so" are not split.
DASH = r"(?:--?|[\u2010-\u2015\u2212\uff0d]{1,2})"
NAME_SEPS = (re.compile(rf"\s{DASH}\s"), re.compile(rf"\s{DASH}|{DASH}\s"))
SENT_END = {
    "en": re.compile(r"(?<!\be\.g)(?<!\bi\.e)(?<!\bcf)(?<!\bvs)[.!?][\"')\]]?(?=\s)"),
    "zh_tw": re.compile(r"[。！？]|[.!?](?=\s)"),
}


def strip_roff(text: str) -> str:
    """Minimal roff-to-text for one-line snippets (tests, NAME lines read raw).

    Full pages go through groff instead; this only handles the escapes that
    appear on NAME lines: fonts, \\-, \\(em, zero-width \\& and \\%.
    """
    text = re.sub(r"^\.[A-Za-z]+\s*", "", text, flags=re.M)  # .B / .BR request names
    text = re.sub(r"\\f(?:\[[^\]]*\]|\([A-Za-z]{2}|.)", "", text)
    text = text.replace("\\-", "-").replace("\\(em", "\u2014").replace("\\[em]", "\u2014")
    text = re.sub(r"\\[&%c/,]", "", text).replace("\\e", "\\")
    return text.replace('"', "")


def parse_name(text: str) -> str:
    """Return the summary after the NAME separator, or '' if there is none.

    `open, openat, creat \\- open and possibly create a file` (roff) and
    `cp - 複製檔案和目錄` (rendered) both work; the names before the first
    separator are dropped because they would leak the answer into the query.
    """
    if "\\" in text or text.lstrip().startswith("."):
        text = strip_roff(text)
    text = " ".join(text.split())
    for sep in NAME_SEPS:
        m = sep.search(text)
        if m:
            return text[m.end():].strip()
    return ""


def normalize(text: str, lang: str) -> str:
    """Collapse whitespace; for Chinese also drop blanks between CJK characters.

    groff turns every source line break into a blank, which is wrong inside
    Chinese text ("畫 著一個箭頭"), whereas blanks next to Latin words stay.
    """
    text = " ".join(text.split())
    if lang != "en":
        text = re.sub(f"(?<=[{CJK}]) (?=[{CJK}])", "", text)
    return text


def truncate(text: str, limit: int, lang: str) -> str:
    """Keep about `limit` chars, ending at a sentence boundary when one exists
    in the last two thirds of the window; else at a word boundary (en) or
    hard at `limit` (zh), so positives stay short enough for small encoders."""
    if len(text) <= limit:
        return text
    head = text[: limit + 1]  # one extra char so "(?=\s)" can see past the end
    ends = [m.end() for m in SENT_END[lang].finditer(head) if limit // 3 <= m.end() <= limit]
    if ends:
        return head[: ends[-1]].strip()
    if lang == "en" and " " in head:
        return head[: head.rfind(" ")].rstrip(" ,;:")
    return text[:limit].rstrip()


def clean_description(lines: list[str], lang: str) -> str:
    """Rendered DESCRIPTION body -> one cleaned, truncated passage.

    Drops the Tcl/Tk change bars (a "│" far right of a line, from .VS/.VE) and
    tbl rules ("────"), which are layout, not text.
    """
    lines = [re.sub(r"\s{2,}\u2502\s*$|[\u2500-\u257f]{3,}", " ", line) for line in lines]
    return truncate(normalize(" ".join(lines), lang), LIMITS[lang]["max_chars"], lang)


def split_sections(rendered: str) -> list[tuple[str, list[str]]]:
    """Split `man` output into (heading, body lines); headings sit at column 0.

    The running header and footer (e.g. "open(2)   System Calls Manual   open(2)")
    also sit at column 0 but contain long runs of blanks, and the Tcl/Tk pages'
    .BS/.BE boxes render as rules of underscores: neither is a heading.
    """
    sections: list[tuple[str, list[str]]] = []
    for line in rendered.splitlines():
        if re.fullmatch(r"\s*[_\-=]{5,}\s*", line):
            continue
        if line and not line[0].isspace():
            if not re.search(r"\s{5}", line):
                sections.append((line.strip(), []))
        elif sections:
            sections[-1][1].append(line)
    return sections


def heading_words(heading: str) -> set[str]:
    """Tokens of a heading with quotes and (full-width) brackets removed;
    blanks between Han characters go too ("描 述" in raw.7)."""
    heading = re.sub(f"(?<=[{HAN}]) +(?=[{HAN}])", "", heading)
    return set(re.split(r"[\s\"'()（）\[\]【】:：]+", heading.upper())) - {""}


def extract(rendered: str, lang: str) -> tuple[str, str]:
    """Return (query, positive) from a rendered page; '' where missing."""
    secs = split_sections(rendered)
    name_i = next((i for i, (h, _) in enumerate(secs) if heading_words(h) & NAME_WORDS), None)
    if name_i is None:
        return "", ""
    query = normalize(parse_name(" ".join(secs[name_i][1])), lang)
    rest = secs[name_i + 1:]
    desc = next((b for h, b in rest if heading_words(h) & DESC_WORDS), None)
    if desc is None:
        desc = next((b for h, b in rest if heading_words(h) & DESC_FALLBACK), [])
    return query, clean_description(desc, lang) if desc else ""


def render(path: Path) -> str:
    """Render one page to plain UTF-8 text with man-db (no hyphenation/justification)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MAN", "GROFF"))}
    env.update(LC_ALL="C.UTF-8", MANWIDTH="10000")
    proc = subprocess.run(["man", "--nh", "--nj", "-l", str(path)], capture_output=True, env=env)
    return re.sub(r".\x08|\x1b\[[0-9;]*m", "", proc.stdout.decode("utf-8", "replace"))


def is_so_stub(path: Path) -> bool:
    """True for pages whose first request is `.so` (a redirect to another page)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8", errors="replace") as f:
        for line in f:
            s = line.strip()
            if s and not s.startswith(('.\\"', "'\\\"", '\\"')):
                return s.startswith(".so ")
    return True  # empty file


def real_pages(paths) -> list[tuple[str, Path]]:
    """(page id like "open.2", path) of regular files that are not .so stubs,
    sorted by id; symlinks are aliases of other pages and are dropped."""
    keep = [p for p in map(Path, paths) if p.is_file() and not p.is_symlink() and not is_so_stub(p)]
    return sorted((re.sub(r"\.gz$", "", p.name), p) for p in keep)


def en_pages() -> list[tuple[str, Path]]:
    """Files of the installed `manpages` and `manpages-dev` packages, sections 2-5, 7."""
    out = subprocess.run(["dpkg", "-L", "manpages", "manpages-dev"], capture_output=True,
                         text=True, check=True).stdout
    return real_pages(p for p in out.splitlines() if EN_PAGE_RE.match(p))


def zh_pages(source: str, zh_dir: str | None, workdir: str) -> list[tuple[str, Path]]:
    """zh_TW pages from an extracted manpages-zh tree, or from the freshly
    downloaded .deb (`apt-get update` must have run once on the machine)."""
    if source == "deb":
        subprocess.run(["apt-get", "download", "manpages-zh"], cwd=workdir, check=True)
        deb = next(Path(workdir).glob("manpages-zh_*.deb"))
        print(f"using {deb.name}", file=sys.stderr)
        subprocess.run(["dpkg-deb", "-x", str(deb), f"{workdir}/x"], check=True)
        zh_dir = f"{workdir}/x"
    root = Path(zh_dir or ".")
    if (root / "usr/share/man/zh_TW").is_dir():
        root = root / "usr/share/man/zh_TW"
    if root.name != "zh_TW":
        sys.exit(f"no usr/share/man/zh_TW under {zh_dir}")
    return real_pages(root.glob("man*/*"))


def tokenize(text: str, lang: str) -> list[str]:
    """BM25 tokens: lowercase words for en; for zh, character bigrams of every
    Han run (single chars stay unigrams) plus lowercase Latin words, since the
    Chinese pages keep command and option names in ASCII."""
    if lang == "en":
        return re.findall(r"[a-z0-9_]+", text.lower())
    tokens = []
    for run in re.findall(f"[{HAN}]+|[a-z0-9_]+", text.lower()):
        if re.match(f"[{HAN}]", run) and len(run) > 1:
            tokens.extend(run[i: i + 2] for i in range(len(run) - 1))
        else:
            tokens.append(run)
    return tokens


def mine_negatives(queries: list[str], positives: list[str], lang: str,
                   k: int = 4, skip_top: int = 1) -> list[list[str]]:
    """BM25 hard negatives: rank positives of the same split by the query,
    drop the row's own positive and any identical passage, skip the best
    `skip_top` remaining hits (likely unlabelled true positives), keep `k`."""
    from rank_bm25 import BM25Okapi

    bm25 = BM25Okapi([tokenize(p, lang) or ["\0"] for p in positives])
    result = []
    for i, query in enumerate(queries):
        scores = bm25.get_scores(tokenize(query, lang))
        order = sorted(range(len(positives)), key=lambda j: (-scores[j], j))
        seen, hits = {positives[i]}, []
        for j in order:
            if j != i and positives[j] not in seen:
                seen.add(positives[j])
                hits.append(positives[j])
            if len(hits) >= skip_top + k:
                break
        result.append(hits[skip_top:])
    return result


def is_eval(pid: str, seed: str, eval_percent: int) -> bool:
    """Deterministic split by page: a seeded hash, independent of page order or
    of which other pages exist, so a rebuild never moves a page across splits."""
    digest = hashlib.sha256(f"{seed}:{pid}".encode()).hexdigest()
    return int(digest, 16) % 100 < eval_percent


def untranslated(query: str, pos: str) -> bool:
    """manpages-zh leaves some NAME lines or whole sections in English; such
    rows would teach nothing Chinese, so require Han in the query and >=20% of
    the positive."""
    han = len(re.findall(f"[{HAN}]", pos))
    return not re.search(f"[{HAN}]", query) or han < 0.2 * len(pos)


def build_rows(pages: list[tuple[str, Path]], lang: str) -> list[dict]:
    """Render, extract, filter short pages and drop duplicates (first id wins)."""
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        rendered = list(pool.map(render, [p for _, p in pages]))
    skipped = {"short_query": 0, "short_desc": 0, "untranslated": 0, "duplicate": 0}
    seen_q, seen_p, rows = set(), set(), []
    for (pid, _), text in zip(pages, rendered, strict=True):
        query, pos = extract(text, lang)
        kq, kp = query.casefold(), pos.casefold()
        reason = ("short_query" if ((len(query.split()) < 3) if lang == "en" else (len(query) < 2))
                  else "short_desc" if len(pos) < LIMITS[lang]["min_desc"]
                  else "untranslated" if lang != "en" and untranslated(query, pos)
                  else "duplicate" if kq in seen_q or kp in seen_p else None)
        if reason:
            skipped[reason] += 1
            continue
        seen_q.add(kq)
        seen_p.add(kp)
        rows.append({"query": query, "pos": [pos], "neg": [], "id": pid})
    print(f"{lang}: {len(pages)} pages, {len(rows)} rows, skipped {skipped}", file=sys.stderr)
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lang", choices=sorted(LIMITS), required=True)
    ap.add_argument("--source", choices=["deb", "dir"], default="deb",
                    help="zh_tw only: download manpages-zh .deb, or read --zh-dir")
    ap.add_argument("--zh-dir", help="extracted manpages-zh root (or its zh_TW folder)")
    ap.add_argument("--out-dir", default=str(Path(__file__).resolve().parents[1] / "datasets"))
    ap.add_argument("--seed", default="embedrag-manpages-v1")
    ap.add_argument("--eval-percent", type=int, default=20)
    ap.add_argument("--negatives", type=int, default=4)
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        pages = en_pages() if args.lang == "en" else zh_pages(args.source, args.zh_dir, tmp)
        rows = build_rows(pages, args.lang)
    for split in ("train", "eval"):
        want_eval = split == "eval"
        part = [r for r in rows if is_eval(r["id"], args.seed, args.eval_percent) == want_eval]
        negs = mine_negatives([r["query"] for r in part], [r["pos"][0] for r in part],
                              args.lang, k=args.negatives)
        out = Path(args.out_dir) / f"manpages_{args.lang}_{split}.jsonl"
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("w", encoding="utf-8") as f:
            for row, neg in zip(part, negs, strict=True):
                row["neg"] = neg
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        chars = sum(len(r["query"]) + len(r["pos"][0]) for r in part)
        print(f"wrote {out} ({len(part)} rows, {chars} query+pos chars)", file=sys.stderr)


if __name__ == "__main__":
    main()
