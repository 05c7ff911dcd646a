"""Fast tests of the pure parts of scripts/build_manpage_dataset.py.

No man, groff, apt or network needed: pages are given as small inline strings
shaped like real `man -l` output and roff sources from the two Debian packages.
"""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "build_manpage_dataset.py"
_spec = importlib.util.spec_from_file_location("build_manpage_dataset", SCRIPT)
bmd = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bmd)

PAD = " " * 40  # header/footer lines carry long runs of blanks, like real output
EN_PAGE = f"""open(2){PAD}System Calls Manual{PAD}open(2)

NAME
       open, openat, creat - open and possibly create a file

SYNOPSIS
       #include <fcntl.h>

DESCRIPTION
       The open() system call opens the file specified by pathname.  If it does not exist,
       it may be created by open().

       The return value of open() is a file descriptor.
   Subsection
       More text.

RETURN VALUE
       On success, the new file descriptor is returned.

Linux man-pages 6.03{PAD}2023-02-05{PAD}open(2)
"""
ZH_PAGE = f"""CP(1){PAD}使用者命令{PAD}CP(1)
______________________________________________________________

NAME(名稱)
       cp - 複製檔案和目錄

概述
       cp [選項]... 來源 目標

"描述 DESCRIPTION"
       從指定的來原始檔複製到 目標處，或者將多個原始檔複製到目標目錄中。 使用 -a 選項{PAD}│
       時保留全部屬性。

GNU coreutils 9.1{PAD}2022年9月{PAD}CP(1)
"""


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (r"open, openat, creat \- open and possibly create a file",
         "open and possibly create a file"),
        (r"\fBld.so\fR, \fBld\-linux.so\fR \- dynamic linker/loader", "dynamic linker/loader"),
        (".B cp\n\\- 複製檔案和目錄", "複製檔案和目錄"),
        ("cp - 複製檔案和目錄", "複製檔案和目錄"),
        ("ld.so, ld-linux.so - dynamic linker/loader", "dynamic linker/loader"),
        ("dig — 傳送域名查詢資訊包到域名伺服器", "傳送域名查詢資訊包到域名伺服器"),
        ("write -在一個檔案描述符上執行寫操作", "在一個檔案描述符上執行寫操作"),
        ("/etc/securetty 由 login(1) 使用", ""),
    ],
)
def test_parse_name_roff_and_plain(line, expected):
    assert bmd.parse_name(line) == expected


def test_extract_english_page():
    query, pos = bmd.extract(EN_PAGE, "en")
    assert query == "open and possibly create a file"
    assert pos.startswith("The open() system call opens the file specified by pathname. If it "
                          "does not exist, it may be created by open(). The return value")
    assert pos.endswith("Subsection More text.")  # paragraphs joined, blanks collapsed
    assert "RETURN" not in pos and "  " not in pos


def test_extract_chinese_page_heading_variants_and_cleanup():
    query, pos = bmd.extract(ZH_PAGE, "zh_tw")
    assert query == "複製檔案和目錄"
    # blanks between Han characters go, blanks next to Latin stay, change bar dropped
    assert pos == ("從指定的來原始檔複製到目標處，或者將多個原始檔複製到目標目錄中。"
                   "使用 -a 選項時保留全部屬性。")


def test_truncate_prefers_sentence_boundary():
    en = "First sentence is here, e.g. with an example. " * 20
    cut = bmd.truncate(en.strip(), 600, "en")
    assert len(cut) <= 600 and cut.endswith("example.")
    zh = "這是一個很長的句子，用來測試截斷。" * 30
    cut = bmd.truncate(zh, 300, "zh_tw")
    assert len(cut) <= 300 and cut.endswith("。")
    assert bmd.truncate("short text.", 600, "en") == "short text."
    assert len(bmd.truncate("x" * 500, 300, "zh_tw")) == 300  # no boundary: hard cut


def test_split_is_deterministic_and_roughly_80_20():
    ids = [f"page{i}.3" for i in range(2000)]
    first = [bmd.is_eval(i, "seed", 20) for i in ids]
    assert first == [bmd.is_eval(i, "seed", 20) for i in ids]
    assert 0.16 < sum(first) / len(ids) < 0.24
    assert first != [bmd.is_eval(i, "other-seed", 20) for i in ids]


def test_zh_tokenize_uses_bigrams_and_keeps_ascii_words():
    assert bmd.tokenize("複製檔案 cp -R", "zh_tw") == ["複製", "製檔", "檔案", "cp", "r"]
    assert bmd.tokenize("Open a File!", "en") == ["open", "a", "file"]


def test_negatives_never_equal_own_positive_and_skip_top_hit():
    positives = [
        "open a file and return a file descriptor",
        "open a file and return a file descriptor",  # identical text on another row
        "close a file descriptor",
        "read from a file descriptor",
        "write to a file descriptor",
        "create a new process",
        "map files into memory",
        "send a signal to a process",
    ]
    queries = ["open a file", "open file", "close descriptor", "read descriptor",
               "write descriptor", "new process", "map memory", "signal process"]
    full = bmd.mine_negatives(queries, positives, "en", k=7, skip_top=0)
    negs = bmd.mine_negatives(queries, positives, "en", k=4, skip_top=1)
    for i, row_negs in enumerate(negs):
        assert positives[i] not in row_negs
        assert len(row_negs) == 4 and len(set(row_negs)) == 4
        assert row_negs == full[i][1:5]  # best non-self hit skipped, ranks 2..5 kept


def test_so_stub_detection(tmp_path):
    stub, page = tmp_path / "stub.3.gz", tmp_path / "page.3.gz"
    stub.write_bytes(gzip.compress(b'.\\" comment\n.so man3/other.3\n'))
    page.write_bytes(gzip.compress(b'.TH PAGE 3\n.SH NAME\npage \\- a page\n'))
    assert bmd.is_so_stub(stub) and not bmd.is_so_stub(page)
    assert [pid for pid, _ in bmd.real_pages([page, stub])] == ["page.3"]
