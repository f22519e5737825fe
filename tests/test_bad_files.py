"""A corpus or image file that cannot be used gives one line naming the file, the 1-based line
(or record) and what is wrong there: exit 2, no traceback, no run directory.

Every case runs the real CLI (`python -m ssltrain data=text_files data.paths=...` or
`data=image_folder data.path=...`) on real files written into tmp_path; the problems only show
when the files are read, inside the run, which must leave nothing behind.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
from conftest import TINY
from test_cli_errors import assert_one_line_error_and_nothing_written
from test_images import IMAGE_TINY


def write(files: dict[str, bytes]) -> Callable[[Path], None]:
    def make(root: Path) -> None:
        for name, content in files.items():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_bytes(content)

    return make


GOOD_JSONL = b"".join(b'{"text": "Document %d has a few words in it."}\n' % i for i in range(6))


def parquet_with_int_text(root: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": [1, 2, 3], "label": ["a", "b", "c"]}), root / "ints.parquet")


@dataclass
class Case:
    args: list[str]  # "{tmp}" is replaced by the test's tmp_path
    expect: list[str]  # substrings of the error line
    make: Callable[[Path], None]  # writes the input files into tmp_path


TEXT = ["data=text_files", *TINY]

TEXT_CASES = {
    # JSON Lines whose text is a number: datasets reads it (as int64, or its Json type when mixed) and
    # the length filter raised TypeError.
    "jsonl-number-text": Case([*TEXT, "data.paths={tmp}/n.jsonl"],
                              ["{tmp}/n.jsonl", "line 2", "'text' = 5", "JSON number", "not a string"],
                              write({"n.jsonl": b'{"text": "A first document."}\n{"text": 5}\n{"text": "More."}\n'})),
    "jsonl-all-number-text": Case([*TEXT, "data.paths={tmp}/n.jsonl"], ["{tmp}/n.jsonl", "line 1", "'text' = 5"],
                                  write({"n.jsonl": b'{"text": 5}\n{"text": 6}\n'})),
    "jsonl-array-text": Case([*TEXT, "data.paths={tmp}/a.jsonl"], ["{tmp}/a.jsonl", "line 3", "JSON array"],
                             write({"a.jsonl": b'{"text": "One."}\n{"text": "Two."}\n{"text": ["three"]}\n'})),
    # A bare value where an object belongs.
    "jsonl-number-line": Case([*TEXT, "data.paths={tmp}/v.jsonl"], ["{tmp}/v.jsonl", "line 2 is 5", "not an object"],
                              write({"v.jsonl": b'{"text": "A first document."}\n5\n{"text": "More."}\n'})),
    # Malformed JSON on line 3 (pyarrow said "row 2", counted from 0 within its block).
    "jsonl-malformed-line": Case([*TEXT, "data.paths={tmp}/m.jsonl"],
                                 ["{tmp}/m.jsonl", "line 3 is not valid JSON"],
                                 write({"m.jsonl": b'{"text": "a b"}\n{"text": "c d"}\n{"text": broken\n'
                                                   b'{"text": "x"}\n'})),
    # Of several files the bad one is named (the message named the first file whatever failed).
    "jsonl-second-file": Case([*TEXT, "data.paths={tmp}/corpus"], ["{tmp}/corpus/b.jsonl", "line 4"],
                              write({"corpus/a.jsonl": GOOD_JSONL,
                                     "corpus/b.jsonl": b"".join(GOOD_JSONL.splitlines(keepends=True)[:3])
                                     + b'{"text": "unclosed\n'})),
    "json-array-record": Case([*TEXT, "data.paths={tmp}/r.json"], ["{tmp}/r.json", "record 2", "'text' = 5"],
                              write({"r.json": b'[{"text": "A first document."}, {"text": 5}]'})),
    # CSV: the header lacks the text column.
    "csv-missing-column": Case([*TEXT, "data.paths={tmp}/c.csv"],
                               ["{tmp}/c.csv", "line 1", "data.text_column='text'", "body, label"],
                               write({"c.csv": b"body,label\nSome words here.,1\nMore words.,2\n"})),
    # CSV: a byte that is not UTF-8, on line 3.
    "csv-not-utf8": Case([*TEXT, "data.paths={tmp}/l.csv"], ["{tmp}/l.csv", "line 3", "UTF-8"],
                         write({"l.csv": "text\nPlain words.\nCaf\u00e9 cr\u00e8me.\n".encode("latin-1")})),
    # CSV: a row with more fields than the header, in the second of two files.
    "csv-ragged-row": Case([*TEXT, "data.paths={tmp}/csvs"],
                           ["{tmp}/csvs/b.csv", "line 3 has 3 fields", "header (line 1) has 2"],
                           write({"csvs/a.csv": b"text,label\nGood words.,1\nMore good words.,2\n",
                                  "csvs/b.csv": b"text,label\nFine.,1\nOne, two,2\nThree.,3\n"})),
    "csv-unclosed-quote": Case([*TEXT, "data.paths={tmp}/q.csv"], ["{tmp}/q.csv", "line 3", "quoted field"],
                               write({"q.csv": b'text\n"A quoted document."\n"This quote never ends\nfoo\n'})),
    # Parquet: the text column holds integers.
    "parquet-int-column": Case([*TEXT, "data.paths={tmp}/ints.parquet"],
                               ["{tmp}/ints.parquet", "'text'", "int64", "not strings"], parquet_with_int_text),
}


def png(path: Path, width: int, height: int) -> None:
    """A valid all-black 1-bit grey PNG of width x height: a few KB that decode to width * height pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\0" * (1 + (width + 7) // 8)  # the filter byte, then 8 pixels a byte
    compressor = zlib.compressobj(9)
    data = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
                     + chunk(b"IDAT", data) + chunk(b"IEND", b""))


def image_folder_with(bad: Callable[[Path], None]) -> Callable[[Path], None]:
    """tmp_path/imgs: a few good images in two classes, then `bad` writes its file into it."""
    def make(root: Path) -> None:
        import numpy as np
        from PIL import Image

        rng = np.random.default_rng(0)
        for cls in ("cat", "dog"):
            (root / "imgs" / cls).mkdir(parents=True)
            for i in range(3):
                pixels = rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / "imgs" / cls / f"{i}.png")
        bad(root / "imgs")

    return make


def bmp_claiming(width: int, height: int) -> Callable[[Path], None]:
    """A real 8x8 BMP whose header has been corrupted to claim width x height pixels."""
    def bad(folder: Path) -> None:
        import io

        from PIL import Image

        buffer = io.BytesIO()
        Image.new("RGB", (8, 8), "white").save(buffer, "BMP")
        data = bytearray(buffer.getvalue())
        data[18:26] = struct.pack("<ii", width, height)  # BITMAPINFOHEADER width, height
        (folder / "dog" / "corrupt.bmp").write_bytes(bytes(data))

    return bad


IMAGES = ["objective=rotation", "data=image_folder", "data.path={tmp}/imgs", *IMAGE_TINY]


def _limit() -> str:
    from PIL import Image

    return f"Image.MAX_IMAGE_PIXELS={Image.MAX_IMAGE_PIXELS}"


IMAGE_CASES = {
    # 900 million pixels in 110 KB: PIL raises DecompressionBombError (a traceback).
    "png-bomb-over-twice-the-limit": Case(IMAGES, ["{tmp}/imgs/cat/bomb.png", "decompression bomb", "LIMIT"],
                                          image_folder_with(lambda d: png(d / "cat" / "bomb.png", 30000, 30000))),
    # 100 million pixels in 12 KB: PIL only warns (DecompressionBombWarning) and decodes it in full.
    "png-bomb-over-the-limit": Case(IMAGES, ["{tmp}/imgs/cat/bomb.png", "decompression bomb", "LIMIT"],
                                    image_folder_with(lambda d: png(d / "cat" / "bomb.png", 10000, 10000))),
    # A corrupt header that claims a huge image (PIL's DecompressionBombError, a traceback).
    "bmp-corrupt-header": Case(IMAGES, ["{tmp}/imgs/dog/corrupt.bmp", "decompression bomb"],
                               image_folder_with(bmp_claiming(100000, 100000))),
}

CASES = {**TEXT_CASES, **IMAGE_CASES}


@pytest.mark.parametrize("name", list(CASES))
def test_a_bad_file_is_one_line_naming_the_file_and_line(name, run_cli, tmp_path):
    """Catches a traceback (TypeError from a number as text, PIL's DecompressionBombError), a
    message naming the wrong file or the wrong line (pyarrow's 0-based row in its block), a
    decompression bomb decoded after PIL's warning, and a run directory left behind."""
    case = CASES[name]
    case.make(tmp_path)
    before = set(tmp_path.iterdir())
    args = [a.replace("{tmp}", str(tmp_path)) for a in case.args]
    proc = run_cli(*args, f"hydra.run.dir={tmp_path}/run", f"hydra.sweep.dir={tmp_path}/multirun")
    expect = [e.replace("{tmp}", str(tmp_path)).replace("LIMIT", _limit()) for e in case.expect]
    assert_one_line_error_and_nothing_written(proc, expect, tmp_path, before)


@pytest.mark.slow
def test_a_csv_text_column_of_numbers_is_read_as_text(run_cli, tmp_path):
    """CSV has no types: a text column whose cells look like numbers ("100007919") is text. Catches
    pandas' inference turning it into int64 / float64, which failed with a TypeError traceback."""
    lines = ["text,label"] + [f"{10**8 + 7919 * i},{i % 2}" for i in range(2000)]
    (tmp_path / "numbers.csv").write_text("\n".join(lines) + "\n")
    proc = run_cli("data=text_files", f"data.paths={tmp_path}/numbers.csv", *TINY, "trainer.max_steps=1",
                   "trainer.eval_batches=1", "data.max_docs=null", f"hydra.run.dir={tmp_path}/run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()
