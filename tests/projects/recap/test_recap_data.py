"""Heavy Ranker data: the planted-signal generator, disjoint resumable shares per worker,
one-line errors for bad files, and the TFRecord -> parquet converter (fuzzed)."""

import gzip
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import given
from tfrecord.writer import TFRecordWriter
from torchmetrics.functional.classification import binary_auroc

from projects.home.recap.config import RecapConfig
from projects.home.recap.data.convert import convert, convert_file
from projects.home.recap.data.dataset import RecapDataset
from projects.home.recap.data.generate import generate
from projects.home.recap.data.generate import main as generate_main
from projects.home.recap.data.schema import load_schema
from tests.fuzz_support import FUZZ_SETTINGS, files_under, mutated, outcome
from tests.recap_setup import SCHEMA, TASKS, config_dict, write_schema
from tml.core.config import parse_config
from tml.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("recap")
    schema = write_schema(str(root))
    generate(str(root / "data"), rows=600, schema_path=schema, files=3, num_users=20,
             num_authors=10, num_tweets=50, position_index=3)
    return root, schema


def _config(schema, inputs, batch=64, edit=None):
    data = config_dict(schema, inputs, batch=batch)
    if edit:
        edit(data)
    return parse_config(RecapConfig, data)


def _rows(dataset, limit=None):
    out = []
    for index, batch in enumerate(dataset):
        if limit is not None and index == limit:
            break
        out.append(batch.continuous_features)
    return torch.cat(out)


def test_generator_follows_the_schema_and_plants_signal(small):
    root, schema = small
    files = sorted(os.listdir(root / "data"))
    assert files == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    table = pa.concat_tables([pq.read_table(root / "data" / f) for f in files])
    assert table.num_rows == 600
    assert set(table.schema.names) == {f["feature_name"] for f in SCHEMA["schema"]}
    # planted: a linear fit on half the rows ranks the other half's labels far beyond chance
    cont = np.stack(table["home_recap_2022_cont__segdense_vals"].to_numpy(zero_copy_only=False))
    z = np.sign(cont[:, :16]) * np.log1p(np.abs(cont[:, :16])) / 1.5
    binary = np.stack(table["home_recap_2022_binary__segdense_vals"]
                      .to_numpy(zero_copy_only=False))[:, :16]
    users = np.eye(20)[table["meta.user_id"].to_numpy()]
    x = np.hstack([z, binary, users, np.ones((600, 1))])
    for task in TASKS:
        label = table[task].to_numpy()
        assert 0.1 < label.mean() < 0.9
        w = np.linalg.lstsq(x[:300], label[:300], rcond=None)[0]
        auc = binary_auroc(torch.tensor(x[300:] @ w), torch.tensor(label[300:]))
        assert auc > 0.7, (task, auc)


def test_generate_command_writes_parquet(tmp_path, capsys):
    schema = write_schema(str(tmp_path))
    generate_main(["--out", str(tmp_path / "d"), "--rows", "10", "--schema", schema])
    assert "wrote 10 examples to 2 file(s)" in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path / "d")) == ["part-00000.parquet", "part-00001.parquet"]


def test_workers_read_disjoint_equal_shares(small):
    root, schema = small
    config = _config(schema, str(root / "data" / "*.parquet"), batch=64)
    whole = _rows(RecapDataset(config.train_data, config.model, 0, 1, repeat=False))
    shares = [RecapDataset(config.train_data, config.model, r, 2, repeat=False)
              for r in range(2)]
    assert len(shares[0]) == len(shares[1]) == 300 // 32
    first, second = _rows(shares[0]), _rows(shares[1])
    assert len(first) == len(second) == 9 * 32
    # rank 0 reads rows 0..287, rank 1 rows 300..587 (across file boundaries)
    assert torch.equal(first, whole[:288])
    small_batches = _config(schema, str(root / "data"), batch=4)
    full = _rows(RecapDataset(small_batches.train_data, config.model, 0, 1, repeat=False))
    assert torch.equal(second, full[300:588])


def test_labels_are_picked_by_task_name_with_weights(small):
    root, schema = small

    def edit(c):
        c["train_data"]["tasks"][TASKS[1]] = {"pos_downsampling_rate": 0.5,
                                              "neg_downsampling_rate": 0.25}
    config = _config(schema, str(root / "data"), edit=edit)
    batch = next(iter(RecapDataset(config.train_data, config.model, 0, 1)))
    table = pq.read_table(root / "data" / "part-00000.parquet")
    for index, task in enumerate(TASKS):
        assert batch.labels[:, index].tolist() == table[task].to_numpy()[:64].tolist()
    label = batch.labels[:, 1]
    assert torch.equal(batch.weights[:, 1], torch.where(label > 0, 2.0, 4.0))
    assert torch.equal(batch.weights[:, 0], torch.ones(64))
    assert batch.continuous_features.shape == (64, 20)      # truncated from 24
    assert batch.user_embedding.shape == (64, 8)


def test_resume_continues_at_the_same_batch(small):
    root, schema = small
    config = _config(schema, str(root / "data"), batch=64)
    dataset = RecapDataset(config.train_data, config.model, 0, 1)
    iterator = iter(dataset)
    for _ in range(11):       # past the end of the first epoch (9 batches)
        next(iterator)
    state = dataset.state_dict()
    expected = next(iterator).continuous_features
    again = RecapDataset(config.train_data, config.model, 0, 1)
    again.load_state_dict(state)
    assert state == {"epoch": 1, "batch": 2}
    assert torch.equal(next(iter(again)).continuous_features, expected)


def _bad_copy(root, tmp_path, edit):
    table = pq.read_table(root / "data" / "part-00000.parquet")
    table = edit(table)
    path = tmp_path / "bad.parquet"
    pq.write_table(table, path)
    return str(path)


def _set(table, name, array):
    return table.set_column(table.schema.get_field_index(name), name, array)


@pytest.mark.parametrize("edit, message", [
    (lambda t: _set(t, TASKS[1], pa.array(np.r_[t[TASKS[1]].to_numpy()[:7], 2,
                                                t[TASKS[1]].to_numpy()[8:]])),
     r"bad.parquet: row 7: label 'recap.engagement.is_replied' \('recap.engagement.is_replied'"
     r"\) is 2; expected 0..1$"),
    (lambda t: t.drop_columns([TASKS[0]]),
     r"bad.parquet: missing column 'recap.engagement.is_favorited'"),
    (lambda t: _set(t, "home_recap_2022_cont__segdense_vals",
                    pa.array([[1.0]] * t.num_rows, pa.list_(pa.float32()))),
     r"bad.parquet: row 0: column 'home_recap_2022_cont__segdense_vals' holds 1 values; the "
     r"schema says 24"),
    (lambda t: _set(t, TASKS[0], pa.array(t[TASKS[0]].to_numpy().astype(str))),
     r"column 'recap.engagement.is_favorited' has type string; expected int64"),
])
def test_bad_rows_are_named(small, tmp_path, edit, message):
    root, schema = small
    config = _config(schema, _bad_copy(root, tmp_path, edit))
    with pytest.raises(DataError, match=message):
        list(RecapDataset(config.train_data, config.model, 0, 1, repeat=False))


def test_id_outside_its_table_is_named(small, tmp_path):
    root, schema = small

    def edit(c):
        c["model"]["large_embeddings"] = {
            "tables": [{"name": "user", "num_embeddings": 5, "embedding_dim": 4,
                        "feature": "meta__user_id"}],
            "optimizer": {"init_learning_rate": 0.1}}
    config = _config(schema, str(root / "data" / "part-00000.parquet"), edit=edit)
    with pytest.raises(DataError, match=r"part-00000.parquet: row \d+: id of table 'user' "
                                        r"\('meta.user_id'\) is \d+; expected 0..4"):
        list(RecapDataset(config.train_data, config.model, 0, 1, repeat=False))


def test_config_errors(small, tmp_path):
    root, schema = small
    config = _config(schema, str(tmp_path / "none" / "*.parquet"))
    with pytest.raises(DataError, match=r"matches no files \(write some with python -m "
                                        "projects.home.recap.data.generate"):
        RecapDataset(config.train_data, config.model, 0, 1)
    config = _config(schema, str(root / "data"), batch=63)
    with pytest.raises(ConfigError, match="global_batch_size 63 is not divisible by the 2"):
        RecapDataset(config.train_data, config.model, 0, 2)
    not_parquet = tmp_path / "x.parquet"
    not_parquet.write_text("hello")
    config = _config(schema, str(not_parquet))
    with pytest.raises(DataError, match=r"x.parquet: cannot read as parquet"):
        RecapDataset(config.train_data, config.model, 0, 1)


# -- TFRecord converter -------------------------------------------------------------------

def _write_tfrecord(path, table, rows=None):
    writer = TFRecordWriter(str(path))
    features = load_schema(write_schema(str(path.parent)))
    for row in table.slice(0, rows).to_pylist():
        writer.write({name: (row[name], "int" if f.dtype == "int64_list" else "float")
                      for name, f in features.items()})
    writer.close()


def test_tfrecord_converts_to_the_same_parquet(small, tmp_path):
    root, schema = small
    table = pq.read_table(root / "data" / "part-00000.parquet")
    _write_tfrecord(tmp_path / "day1.tfrecord", table)
    raw = (tmp_path / "day1.tfrecord").read_bytes()
    (tmp_path / "day2.gz").write_bytes(gzip.compress(raw))
    written = convert([str(tmp_path / "day1.tfrecord"), str(tmp_path / "day2.gz")],
                      str(tmp_path / "out"), schema)
    assert [os.path.basename(p) for p in written] == ["day1.parquet", "day2.parquet"]
    for path in written:
        back = pq.read_table(path)
        assert back.schema.names == table.schema.names
        for name in table.schema.names:
            assert back[name].to_pylist() == table[name].to_pylist(), name
    # the converted files train as the generated ones do
    config = _config(schema, str(tmp_path / "out"))
    assert len(RecapDataset(config.train_data, config.model, 0, 1, repeat=False)) == 400 // 64


def test_tfrecord_errors_are_one_line_and_leave_nothing(small, tmp_path):
    root, schema = small
    table = pq.read_table(root / "data" / "part-00000.parquet")
    _write_tfrecord(tmp_path / "ok.tfrecord", table, rows=3)
    raw = bytearray((tmp_path / "ok.tfrecord").read_bytes())
    raw[30] ^= 0xFF
    (tmp_path / "bad.tfrecord").write_bytes(bytes(raw))
    features = load_schema(schema)
    (tmp_path / "out").mkdir()
    with pytest.raises(DataError, match=r"bad.tfrecord: record 0: bad data checksum"):
        convert_file(str(tmp_path / "bad.tfrecord"), str(tmp_path / "out"), features)
    huge = (2 ** 62).to_bytes(8, "little")
    (tmp_path / "huge.tfrecord").write_bytes(huge + TFRecordWriter.masked_crc(huge) + b"x")
    with pytest.raises(DataError, match=r"huge.tfrecord: record 0: length 4611686018427387904 "
                                        r"exceeds 67108864 bytes"):
        convert_file(str(tmp_path / "huge.tfrecord"), str(tmp_path / "out"), features)
    assert files_under(tmp_path / "out") == set()


@pytest.fixture(scope="module")
def valid_tfrecord(small, tmp_path_factory):
    root, schema = small
    directory = tmp_path_factory.mktemp("tfr")
    _write_tfrecord(directory / "v.tfrecord", pq.read_table(root / "data" /
                                                            "part-00000.parquet"), rows=2)
    return (directory / "v.tfrecord").read_bytes(), load_schema(schema)


def test_tfrecord_converter_fuzz(valid_tfrecord, tmp_path):
    valid, features = valid_tfrecord

    @FUZZ_SETTINGS
    @given(data=mutated(valid))
    def check(data):
        out = tmp_path / "out"
        out.mkdir(exist_ok=True)
        path = tmp_path / "in.tfrecord"
        path.write_bytes(data)
        result = outcome(lambda: convert_file(str(path), str(out), features))
        assert files_under(out) == ({"in.parquet"} if result == "ok" else set())
        for name in os.listdir(out):
            os.remove(out / name)

    check()
