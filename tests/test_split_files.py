"""Split files as editors write them: Windows Notepad's byte-order mark and CRLF line ends, other encodings."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvseg.data.folder import find_samples
from kvseg.data.splits import resolve_split
from kvseg.errors import SplitError


def test_notepad_split_files_read_as_their_ids(dataset_copy: Path) -> None:
    samples = find_samples(dataset_copy)
    expected = resolve_split(dataset_copy, samples, seed=0, test_fraction=0.2)
    val, train = expected.train[:3], expected.train[3:]
    for name, ids in (("train.txt", train), ("test.txt", expected.test)):
        # UTF-8 with a byte-order mark, CRLF line ends, a file name with its extension, trailing blanks
        lines = [ids[0] + ".jpg", *ids[1:]]
        (dataset_copy / name).write_bytes(b"\xef\xbb\xbf" + "".join(f"{line} \r\n" for line in lines).encode() + b"\r\n")
    (dataset_copy / "val.txt").write_bytes("\r".join(val).encode("utf-8-sig"))  # old Mac line ends
    split = resolve_split(dataset_copy, samples, seed=0, test_fraction=0.2)
    assert split.test == expected.test and split.val == val
    assert split.train == train  # the first id is itself, not '\ufeff' + itself
    assert split.source == "split files"


def test_a_split_file_in_another_encoding_is_one_line(dataset_copy: Path) -> None:
    path = dataset_copy / "test.txt"
    path.write_bytes(path.read_text().encode("utf-16"))  # Notepad's "Unicode"
    with pytest.raises(SplitError) as raised:
        resolve_split(dataset_copy, find_samples(dataset_copy), seed=0, test_fraction=0.2)
    message = str(raised.value)
    assert "\n" not in message and f"{path}:1: not UTF-8 text" in message
