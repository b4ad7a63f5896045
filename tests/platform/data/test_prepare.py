import filecmp
import logging
import pickle

import numpy as np
import pytest
import soundfile
from PIL import Image

from polytrain.config.tokenizers import TextTokenizerConfig
from polytrain.errors import DataError
from polytrain.platform.data.file_map import RELEASE_EVERY
from polytrain.platform.data.manifest import Part, Record
from polytrain.platform.data.prepare import prepare_split, shard_builder
from polytrain.platform.data.shards import ROWS_PER_BATCH, PreparedSplit, SplitIndex
from polytrain.platform.data.token_store import tokenizer_sha256
from polytrain.tokenizers.text import TextTokenizer
from tests.platform.data.test_file_map import needs_advice, resident_kib

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


@pytest.fixture(scope="module")
def text() -> TextTokenizer:
    return TextTokenizer.train([" ".join(WORDS), "def f(x): return x"] * 20, TextTokenizerConfig(vocab_size=300))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Files of both modalities and 150 records over them: image -> word, audio -> word, and plain documents."""
    folder = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    records = []
    for i in range(150):
        where, kind = f"m.jsonl:{i + 1}", i % 3
        if kind == 0:
            path = folder / f"{i}.png"
            Image.fromarray(rng.integers(0, 255, (8 + i % 5, 12), dtype=np.uint8)).save(path)
            parts = (Part("image", str(path)), Part("text", WORDS[i % 10], scored=True))
        elif kind == 1:
            path = folder / f"{i}.wav"
            soundfile.write(path, rng.normal(0, 0.1, 800 + 10 * i).astype(np.float32), 8000)
            parts = (Part("audio", str(path)), Part("text", WORDS[i % 10], scored=True))
        else:
            parts = (Part("text", f"def f{i}(x): return x + {i}"),)
        records.append(Record(parts, WORDS[i % 10], f"s{i}", where))
    return folder, records


def prepare(records, out, text, workers=1, **kw):
    with shard_builder(text, workers) as build:
        return prepare_split(records, out, text, {"manifest": "m.jsonl"}, build,
                             shard_records=kw.pop("shard_records", 40), **kw)


def test_records_read_back_with_text_as_ids_and_files_as_their_bytes(inputs, text, tmp_path):
    _, records = inputs
    index = prepare(records, tmp_path / "split", text)
    assert (index.rows, len(index.shards), index.complete, index.documents) == (150, 4, True, False)
    split = PreparedSplit(tmp_path / "split", tokenizer_sha256(text.hf.to_str()))
    assert len(split) == 150
    for i in (0, 1, 2, 41, 80, 149):  # every kind, in several shards and record batches
        got, want = split[i], records[i]
        assert (got.sample_id, got.label) == (want.sample_id, want.label)
        assert got.where == f"{tmp_path / 'split'}/shard-{i // 40:06d}.arrow: member {i % 40} (s{i}, from {want.where})"
        sizes = split.sizes(i)
        for part, source, (modality, scored, *dims) in zip(got.parts, want.parts, sizes, strict=True):
            assert (part.modality, part.scored) == (source.modality, source.scored) == (modality, scored)
            if source.modality == "text":
                assert part.value == tuple(text.encode(source.value)) and dims == [len(part.value), 0]
            else:
                assert part.value == open(source.value, "rb").read()
        first = want.parts[0]
        if first.modality == "image":
            width, height = Image.open(first.value).size
            assert sizes[0][2:] == (height, width)
        elif first.modality == "audio":
            info = soundfile.info(first.value)
            assert sizes[0][2:] == (info.frames, info.samplerate)


def test_documents_read_as_one_stream(text, tmp_path):
    docs = [Record((Part("text", f"def f{i}(x): return {i}"),), None, f"d{i}", f"m:{i}") for i in range(30)]
    index = prepare(docs, tmp_path / "lm", text, shard_records=7)
    assert index.documents
    stream = [i for d in docs for i in (*text.encode(d.parts[0].value), text.eos_id)]
    tokens = PreparedSplit(tmp_path / "lm").tokens
    assert tokens.stream_window(0, len(stream), text.eos_id)[0].tolist() == stream


@needs_advice
def test_reading_a_split_leaves_none_of_its_pages_in_the_process(inputs, text, tmp_path):
    _, records = inputs
    prepare(records, tmp_path / "split", text, shard_records=20)
    split = PreparedSplit(tmp_path / "split")
    read = [split[i] for i in np.random.default_rng(0).permutation(len(split))]
    assert [r.sample_id for r in read] and all(len(split.sizes(i)) for i in range(len(split)))
    assert len(split._open.entries) == 8 and len(split.tokens._mapped.entries) == 8  # every shard is mapped
    # at most the last RELEASE_EVERY reads' pages (a handful each) are resident, then none
    assert resident_kib(tmp_path / "split") <= RELEASE_EVERY * 4 * 4
    split.release(every=1)
    assert resident_kib(tmp_path / "split") == 0
    stream = split.tokens.stream_window(0, split.tokens.stream_length, text.eos_id)[0]
    split.tokens.release(every=1)
    assert len(stream) == split.tokens.stream_length and resident_kib(tmp_path / "split") == 0


def test_a_split_sent_to_a_loader_worker_maps_its_files_anew(inputs, text, tmp_path):
    _, records = inputs
    prepare(records, tmp_path / "split", text)
    split = PreparedSplit(tmp_path / "split")
    first = split[100]
    copy = pickle.loads(pickle.dumps(split))
    assert len(split._open.entries) == 1 and not copy._open.entries and not copy.tokens._mapped.entries
    again = copy[100]
    assert (again.parts, again.where) == (first.parts, first.where)
    assert copy._open.entries and copy._open.open.__self__ is copy  # the copy's own opener, not the original's


def interrupted(records, after):
    for k, record in enumerate(records):
        if k == after:
            raise KeyboardInterrupt
        yield record


def test_an_interrupted_prepare_continues_to_the_same_files(inputs, text, tmp_path):
    """Interrupted, then continued, in this process: the files two worker processes write in one go."""
    _, records = inputs
    prepare(records, tmp_path / "whole", text, workers=2)
    with pytest.raises(KeyboardInterrupt):
        prepare(interrupted(records, 100), tmp_path / "resumed", text)
    assert not SplitIndex.read(tmp_path / "resumed").complete and len(SplitIndex.read(tmp_path / "resumed").shards) == 2
    with pytest.raises(DataError, match="did not finish .* run polytrain data prepare again"):
        PreparedSplit(tmp_path / "resumed")
    prepare(records, tmp_path / "resumed", text)
    names = sorted(p.name for p in (tmp_path / "whole").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "resumed").iterdir())
    match, mismatch, errors = filecmp.cmpfiles(tmp_path / "whole", tmp_path / "resumed", names, shallow=False)
    assert mismatch == errors == []


def test_a_continued_prepare_needs_the_same_settings(inputs, text, tmp_path):
    _, records = inputs
    with pytest.raises(KeyboardInterrupt):
        prepare(interrupted(records, 50), tmp_path / "s", text)
    with pytest.raises(DataError, match="earlier prepare there had shard_records 40, this one has 30"):
        prepare(records, tmp_path / "s", text, shard_records=30)


def test_a_damaged_shard_is_built_again_when_continuing(inputs, text, tmp_path):
    _, records = inputs
    with pytest.raises(KeyboardInterrupt):
        prepare(interrupted(records, 100), tmp_path / "s", text)
    (tmp_path / "s" / "shard-000000.arrow").write_bytes(b"junk")
    prepare(records, tmp_path / "s", text)
    assert PreparedSplit(tmp_path / "s")[0].sample_id == "s0"


def bad_records(inputs):
    folder, records = inputs
    missing = Record((Part("image", str(folder / "nope.png")), Part("text", "one", True)), None, "bad", "m.jsonl:200")
    return records[:50] + [missing] + records[50:]


def test_a_bad_input_names_its_manifest_line(inputs, text, tmp_path):
    with pytest.raises(DataError, match=r"m\.jsonl:200: .*nope\.png: cannot read the image file"):
        prepare(bad_records(inputs), tmp_path / "s", text)


def test_bad_inputs_are_skipped_and_counted(inputs, text, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        index = prepare(bad_records(inputs), tmp_path / "s", text, skip_bad=True)
    assert (index.rows, index.skipped) == (150, 1)
    assert "m.jsonl:200" in caplog.text


@pytest.fixture
def split(inputs, text, tmp_path):
    _, records = inputs
    prepare(records, tmp_path / "s", text)
    return tmp_path / "s"


def test_a_corrupt_member_names_the_shard_and_the_member(split):
    reader = PreparedSplit(split)
    path = split / "shard-000001.arrow"
    data = bytearray(path.read_bytes())
    blob = reader[40 + 3].parts[0].value  # shard 1's 4th record: a clip's bytes
    at = bytes(data).index(blob[-16:])
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"shard-000001\.arrow: member 3 \(s43, from m\.jsonl:44\): audio part 0 "
                                        r"fails its checksum"):
        PreparedSplit(split)[43]
    assert PreparedSplit(split)[44].sample_id == "s44"  # the others still read


def test_a_truncated_shard_is_refused_by_name(split):
    path = split / "shard-000002.arrow"
    path.write_bytes(path.read_bytes()[: -ROWS_PER_BATCH * 8])
    with pytest.raises(DataError, match=r"shard-000002\.arrow: not a readable Arrow shard"):
        PreparedSplit(split)[80]


def test_a_split_prepared_with_another_tokenizer_is_refused_with_both_hashes(split, text):
    other = TextTokenizer.train(["something else entirely"] * 10, TextTokenizerConfig(vocab_size=280))
    ours, theirs = tokenizer_sha256(text.hf.to_str()), tokenizer_sha256(other.hf.to_str())
    with pytest.raises(DataError, match=f"sha256 {ours}, but this run's tokenizer is sha256 {theirs}"):
        PreparedSplit(split, theirs)


def test_a_shard_of_another_prepare_is_refused_with_both_hashes(split, inputs, text, tmp_path):
    other = TextTokenizer.train(["something else entirely"] * 10, TextTokenizerConfig(vocab_size=280))
    prepare(inputs[1], tmp_path / "other", other)
    (split / "shard-000001.arrow").write_bytes((tmp_path / "other" / "shard-000001.arrow").read_bytes())
    ours, theirs = tokenizer_sha256(text.hf.to_str()), tokenizer_sha256(other.hf.to_str())
    with pytest.raises(DataError, match=rf"shard-000001\.arrow: encoded with the text tokenizer sha256 {theirs}, the "
                                        rf"split's is sha256 {ours}"):
        PreparedSplit(split)[41]
    assert PreparedSplit(split)[0].sample_id == "s0"
