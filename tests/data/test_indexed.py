"""preprocess -> Megatron-core indexed dataset -> the trainer's sequences, with real files; and every bad
input named with its file and fix, with nothing half-written."""

import numpy as np
import pytest
import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset

from corpus import stdlib_corpus, stream, tool, write_jsonl
from nsa_dist.config import ConfigError
from nsa_dist.data import check_data, packed_seq_params, source_sequences
from nsa_dist.indexed import DatasetError, check_indexed, paths, write_indexed
from nsa_dist.tokenizer import ByteTokenizer, TokenizerError, load_tokenizer
from tiny import tiny_config

SEQ = 128


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    prefix, texts = stdlib_corpus(root / "code")
    return prefix, texts, root


def _config(prefix, root, *overrides):
    return tiny_config("data.source=indexed", f"data.path={prefix}", "model.vocab_size=256",
                       f"run.dir={root}/run", f"stages.0.seq_len={SEQ}", *overrides)


def test_preprocess_writes_every_document_exactly(corpus):
    prefix, texts, _ = corpus
    dataset = IndexedDataset(prefix)
    expected = stream(texts, ByteTokenizer())
    assert len(dataset) == len(expected)
    for i, tokens in enumerate(expected):
        np.testing.assert_array_equal(dataset[i], tokens)
    info = check_indexed(prefix, ByteTokenizer(), 256)
    assert info.tokens == sum(map(len, expected)) and info.documents == len(expected)


def test_packed_sequences_reproduce_the_source_documents(corpus):
    """Every sequence the trainer gets from Megatron's GPTDataset is documents cut at EOD: each whole
    piece between two EODs is one source document, the edge pieces are a document's end and start."""
    prefix, texts, root = corpus
    config = _config(prefix, root, "data.split=100,0,0")
    documents = {bytes(t[:-1].astype(np.uint8)) for t in stream(texts, ByteTokenizer())}
    sequences = source_sequences(config, SEQ, "train")
    again = source_sequences(config, SEQ, "train")
    whole = 0
    for index in range(200):
        row = sequences(index)
        assert row.shape == (SEQ + 1,) and torch.equal(row, again(index))  # a function of the index
        pieces = bytes(row.to(torch.uint8).tolist()).split(b"\0")
        if len(pieces) == 1:  # inside one document
            assert any(pieces[0] in doc for doc in documents)
            continue
        assert any(doc.endswith(pieces[0]) for doc in documents)
        assert any(doc.startswith(pieces[-1]) for doc in documents)
        for piece in pieces[1:-1]:
            assert piece in documents
            whole += 1
    assert whole > 0  # whole short documents were packed between others


def test_validation_split_holds_other_documents(corpus):
    prefix, texts, root = corpus
    config = _config(prefix, root, "data.split=80,20,0", "data.documents=within")
    train = source_sequences(config, SEQ, "train")
    valid = source_sequences(config, SEQ, "valid")
    docs = stream(texts, ByteTokenizer())
    cut = int(round(0.8 * len(docs)))
    train_text = b"\1".join(bytes(d.astype(np.uint8)) for d in docs[:cut])
    valid_text = b"\1".join(bytes(d.astype(np.uint8)) for d in docs[cut:])
    for index in range(30):
        assert bytes(train(index).to(torch.uint8).tolist()) in train_text  # inside one training document
        assert bytes(valid(index).to(torch.uint8).tolist()) in valid_text


def test_cu_seqlens_match_eod_positions(corpus):
    prefix, _, root = corpus
    sequences = source_sequences(_config(prefix, root, "data.split=100,0,0"), SEQ, "train")
    rows = torch.stack([sequences(i) for i in range(3)])[:, :-1]
    params = packed_seq_params(rows, eod=0)
    cu = params.cu_seqlens_q.tolist()
    expected = [0]
    for r in range(3):
        expected += [r * SEQ + int(p) + 1 for p in torch.nonzero(rows[r] == 0).flatten() if p < SEQ - 1]
        expected.append((r + 1) * SEQ)
    assert cu == expected and params.cu_seqlens_kv is params.cu_seqlens_q
    assert params.max_seqlen_q == max(b - a for a, b in zip(cu, cu[1:]))
    for a, b in zip(cu[1:-1], cu[2:]):  # every document but a row's last ends with its EOD
        row, end = divmod(b - 1, SEQ)
        assert b % SEQ == 0 or rows[row, end] == 0


def test_hf_tokenizer_json_round_trip(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    texts = ["def add(a, b):\n    return a + b\n", "class Point:\n    x: int\n", "print('hello')\n"] * 5
    tokenizer = Tokenizer(models.BPE(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "[UNK]"],
                                                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    source = write_jsonl(tmp_path / "docs.jsonl", texts[:3])
    assert tool("preprocess_data").main(["--input", str(source), "--output", str(tmp_path / "hf"),
                                         "--tokenizer", str(tmp_path / "tokenizer.json")]) == 0
    hf = load_tokenizer(tmp_path / "tokenizer.json")
    assert hf.eod == tokenizer.token_to_id("<|endoftext|>")
    dataset = IndexedDataset(str(tmp_path / "hf"))
    decoded = [hf.decode(dataset[i][:-1]) for i in range(3)]
    assert [dataset[i][-1] for i in range(3)] == [hf.eod] * 3
    assert decoded == texts[:3]
    with pytest.raises(DatasetError, match="was written by the tokenizer"):  # read with the byte tokenizer
        check_indexed(tmp_path / "hf", ByteTokenizer())


def test_tokenizer_file_that_does_not_parse(tmp_path):
    bad = tmp_path / "tokenizer.json"
    bad.write_text('{"model": {"type": "nonsense"}')
    with pytest.raises(TokenizerError, match=f"{bad}.*does not parse"):
        load_tokenizer(bad)
    with pytest.raises(TokenizerError, match="does not exist"):
        load_tokenizer(tmp_path / "missing.json")
    assert tool("preprocess_data").main(["--input", str(bad), "--output", str(tmp_path / "x"),
                                         "--tokenizer", str(bad)]) == 2
    assert not any(p.exists() for p in paths(tmp_path / "x"))


def test_missing_corrupt_and_mismatched_files(corpus, tmp_path):
    prefix, texts, _ = corpus
    good_bin, good_idx, good_meta = paths(prefix)
    with pytest.raises(DatasetError, match=r"x\.idx does not exist.*tools/preprocess_data.py"):
        check_indexed(tmp_path / "x")
    copy = tmp_path / "copy"
    bin_path, idx_path, meta_path = paths(copy)
    bin_path.write_bytes(good_bin.read_bytes())
    idx_path.write_bytes(good_idx.read_bytes()[:-5])  # truncated index
    with pytest.raises(DatasetError, match=r"copy\.idx is corrupt"):
        check_indexed(copy)
    idx_path.write_bytes(b"garbage" * 10)
    with pytest.raises(DatasetError, match="bad header"):
        check_indexed(copy)
    idx_path.write_bytes(good_idx.read_bytes())
    bin_path.write_bytes(good_bin.read_bytes()[:-3])  # truncated tokens
    with pytest.raises(DatasetError, match=r"copy\.bin has .* bytes but .*copy\.idx describes"):
        check_indexed(copy)
    # the .bin and .idx of another dataset: sizes agree with neither
    other, _ = stdlib_corpus(tmp_path / "other", packages=("json",))
    paths(other)[1].replace(idx_path)
    bin_path.write_bytes(good_bin.read_bytes())
    with pytest.raises(DatasetError, match="do not belong together"):
        check_indexed(copy)
    with pytest.raises(DatasetError, match="model.vocab_size=100 cannot embed"):
        check_indexed(prefix, ByteTokenizer(), vocab_size=100)


def test_nothing_half_written(tmp_path):
    def documents():
        yield "first document"
        raise OSError("disk full")

    with pytest.raises(OSError):
        write_indexed(tmp_path / "d", documents(), ByteTokenizer())
    assert list(tmp_path.iterdir()) == []


def test_sequence_longer_than_every_document(corpus):
    prefix, texts, root = corpus
    longest = max(map(len, stream(texts, ByteTokenizer())))
    seq = 1 << (longest.bit_length() + 1)
    config = _config(prefix, root, "data.documents=within", f"stages.0.seq_len={seq}", "nsa.num_selected=3")
    with pytest.raises(DatasetError, match=f"longest document of {prefix} has {longest} tokens.*seq_len={seq}"):
        check_data(config, [seq])


def test_task_shares_must_sum_to_one():
    with pytest.raises(ConfigError, match=r"stages\[0\]\.mix shares must sum to 1 and sum to 0.9"):
        tiny_config("stages.0.mix={source: 0.5, passkey: 0.2, variable_tracking: 0.2}")
    with pytest.raises(ConfigError, match=r"data\.mix\.passkey=-0.5 must be >= 0"):
        tiny_config("data.mix={source: 1.5, passkey: -0.5}")
    with pytest.raises(ConfigError, match=r"needs data\.path"):
        tiny_config("data.source=indexed")


def test_packed_task_samples_must_fit_their_minimum(corpus):
    prefix, _, root = corpus
    with pytest.raises(ConfigError, match=r"data\.mix\.task_min_length=-1 must be >= 0"):
        tiny_config("data.mix={source: 0.5, passkey: 0.5, task_min_length: -1}")
    for bad in ("task_max_length: 64", "task_min_length: 128, task_max_length: 100"):
        with pytest.raises(ConfigError, match=r"data\.mix\.task_max_length=\d+ needs task_min_length > 0"):
            tiny_config(f"data.mix={{source: 0.5, passkey: 0.5, {bad}}}")
    with pytest.raises(ConfigError, match=r"data\.mix\.task_full_share=0.5 needs task_min_length > 0"):
        tiny_config("data.mix={source: 0.5, passkey: 0.5, task_full_share: 0.5}")
    with pytest.raises(ConfigError, match=r"data\.mix\.task_full_share=1.5 must be between 0 and 1"):
        tiny_config("data.mix={source: 0.5, passkey: 0.5, task_min_length: 128, task_full_share: 1.5}")
    config = _config(prefix, root, "stages.0.seq_len=256", "stages.0.mix={source: 0.5, passkey: 0.5, task_min_length: 100}")
    with pytest.raises(DatasetError, match=r"stages\[0\]\.mix\.task_min_length=100 .*too short for a passkey "
                                           r"sample, which needs \d+ tokens and an EOD: set it to at least \d+"):
        check_data(config, [256])
    check_data(_config(prefix, root, "stages.0.seq_len=256", "stages.0.mix={source: 0.5, passkey: 0.5, task_min_length: 150}"),
               [256])


def test_niah_lengths_must_hold_a_sample_where_stages_are_evaluated(corpus):
    """A NIAH length too short for the task's samples is named before training (not after the first stage),
    whether it is listed or is the stage's own seq_len; without stage-end evaluation it does not matter,
    unless the eval command asks (evaluate=True)."""
    prefix, _, root = corpus
    listed = _config(prefix, root, "eval.at_stage_end=true", "eval.niah_lengths=[100, 256]")
    with pytest.raises(DatasetError, match=r"eval\.niah_lengths=\[100, 256\] holds 100, and a passkey sample needs "
                                           r"143 tokens: give lengths of at least 143"):
        check_data(listed, [SEQ])
    own = _config(prefix, root, "eval.at_stage_end=true", "eval.niah_lengths=[256]", "eval.niah_stage_length=true")
    with pytest.raises(DatasetError, match=r"stage 'stage0' is evaluated at its seq_len=128 .* needs 143 tokens"):
        check_data(own, [SEQ])
    check_data(_config(prefix, root, "eval.at_stage_end=false", "eval.niah_lengths=[100]"), [SEQ])
    with pytest.raises(DatasetError, match="holds 100"):
        check_data(_config(prefix, root, "eval.at_stage_end=false", "eval.niah_lengths=[100]"), [SEQ], evaluate=True)
    check_data(_config(prefix, root, "eval.at_stage_end=true", "eval.niah_lengths=[256]"), [SEQ])


def test_loader_workers_make_the_same_micro_batches(corpus):
    """data.workers generate the rows in DataLoader worker processes, ahead of the training thread: the same
    micro-batches (tokens, labels, cu_seqlens) in the same order as on the thread, from any data position."""
    import itertools
    import multiprocessing

    from nsa_dist.data import micro_batches, stage_sequences

    prefix, _, root = corpus
    config = _config(prefix, root, "data.documents=mask", "stages.0.seq_len=320",
                     "stages.0.mix={source: 0.5, passkey: 0.5, task_min_length: 144}")
    stage = config.resolved_stages()[0]
    sequences = stage_sequences(config, stage.seq_len, stage.mix)
    made = {}
    for workers in (0, 2):
        batches = micro_batches(sequences, 8, 2, dp_rank=1, dp_size=2, cp_group=None, device=torch.device("cpu"),
                                first_sequence=5, eod=0, workers=workers)
        made[workers] = list(itertools.islice(batches, 7))
        if workers:
            assert len(multiprocessing.active_children()) >= workers  # the rows came from worker processes
        batches.close()  # the stage ends: its workers with it
    assert not multiprocessing.active_children()
    # DP rank 1 of 2 takes 4 of a step's 8 sequences, in micro-batches of 2 rows: 5 + 8k + 4 + {0, 2}
    for k, first in ((0, 9), (1, 11), (2, 17), (6, 33)):
        rows = torch.stack([sequences(i) for i in (first, first + 1)])
        assert torch.equal(made[0][k]["tokens"], rows[:, :-1]) and torch.equal(made[0][k]["labels"], rows[:, 1:])
    for a, b in zip(made[0], made[2]):
        assert torch.equal(a["tokens"], b["tokens"]) and torch.equal(a["labels"], b["labels"])
        assert a["packed_seq_params"].cu_seqlens_q.tolist() == b["packed_seq_params"].cu_seqlens_q.tolist()
