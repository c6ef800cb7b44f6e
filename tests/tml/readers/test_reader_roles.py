"""Who is a reader and where the readers are: TML_* variables, SLURM's heterogeneous job,
the machines file and the config, in that precedence; bad values are one line."""

from __future__ import annotations

import pytest

from tml.errors import ConfigError
from tml.readers import roles
from tml.readers.config import ReadersConfig

VARS = ("TML_ROLE", "TML_READER_INDEX", "TML_READERS", "TML_NUM_READERS", "TML_READER_PORT",
        "TML_READER_BIND", "TML_TRAINER_WORLD_SIZE", "TML_MACHINES_FILE", "SLURMD_NODENAME",
        "SLURM_JOB_NODELIST_HET_GROUP_1")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in VARS:
        monkeypatch.delenv(name, raising=False)


def test_default_is_a_trainer_without_readers():
    assert not roles.is_reader()
    assert roles.reader_addresses(ReadersConfig()) is None
    assert roles.local_reader_count(ReadersConfig()) == 0


def test_tml_variables_give_role_index_addresses_and_bind_own_entry(monkeypatch):
    monkeypatch.setenv("TML_ROLE", "reader")
    monkeypatch.setenv("TML_READER_INDEX", "1")
    monkeypatch.setenv("TML_READERS", "10.0.0.5:2222,10.0.0.6:2300")
    monkeypatch.setenv("TML_TRAINER_WORLD_SIZE", "16")
    assert roles.is_reader()
    config = ReadersConfig(addresses=["ignored:1"])
    assert roles.reader_addresses(config) == ["10.0.0.5:2222", "10.0.0.6:2300"]
    # A reader on its own node binds the host of its own entry, never 0.0.0.0.
    assert roles.reader_identity(config) == (1, 2, "10.0.0.6", 2300)
    assert roles.trainer_world_size() == 16


def test_slurm_heterogeneous_job_lists_the_reader_nodes(monkeypatch):
    monkeypatch.setenv("SLURM_JOB_NODELIST_HET_GROUP_1", "rd[01-03]")
    monkeypatch.setenv("TML_READER_PORT", "5051")
    monkeypatch.setenv("SLURMD_NODENAME", "gpu07")
    assert not roles.is_reader()
    assert roles.reader_addresses() == ["rd01:5051", "rd02:5051", "rd03:5051"]
    monkeypatch.setenv("SLURMD_NODENAME", "rd02")
    assert roles.is_reader()
    assert roles.reader_identity(ReadersConfig())[:3] == (1, 3, "rd02")


def test_machines_file_counts_dataset_workers_and_trainers(monkeypatch, tmp_path):
    machines = tmp_path / "machines.yaml"
    machines.write_text("chief: {num_accelerators: 4}\nnum_workers: 1\n"
                        "num_dataset_workers: 3\n")
    monkeypatch.setenv("TML_MACHINES_FILE", str(machines))
    assert roles.local_reader_count(ReadersConfig()) == 3
    assert roles.local_reader_count(ReadersConfig(num_readers=2)) == 2   # config first
    monkeypatch.setenv("TML_NUM_READERS", "5")
    assert roles.local_reader_count(ReadersConfig()) == 5
    assert roles.trainer_world_size() == 8


@pytest.mark.parametrize("name,value,message", [
    ("TML_ROLE", "chief", "TML_ROLE='chief' must be reader or trainer"),
    ("TML_READERS", "10.0.0.5:2222,/etc/passwd", "TML_READERS: '/etc/passwd' is not host:port"),
    ("TML_READERS", "a:1;rm -rf /", "is not host:port"),
    ("TML_NUM_READERS", "two", "TML_NUM_READERS='two' must be an integer"),
])
def test_bad_values_are_one_line_naming_the_variable(monkeypatch, name, value, message):
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as error:
        roles.is_reader()
        roles.reader_addresses()
        roles.local_reader_count()
    assert message in str(error.value) and "\n" not in str(error.value)


def test_a_reader_without_index_or_trainer_count_is_told_what_to_set(monkeypatch):
    monkeypatch.setenv("TML_ROLE", "reader")
    with pytest.raises(ConfigError, match="a reader needs its index: set TML_READER_INDEX"):
        roles.reader_identity(ReadersConfig(num_readers=2))
    monkeypatch.setenv("TML_READER_INDEX", "2")
    with pytest.raises(ConfigError, match="TML_READER_INDEX=2 is not one of the 2 readers"):
        roles.reader_identity(ReadersConfig(num_readers=2))
    with pytest.raises(ConfigError, match="set TML_TRAINER_WORLD_SIZE"):
        roles.trainer_world_size()


def test_local_readers_bind_the_configured_host(monkeypatch):
    monkeypatch.setenv("TML_ROLE", "reader")
    monkeypatch.setenv("TML_READER_INDEX", "0")
    monkeypatch.setenv("TML_NUM_READERS", "1")
    assert roles.reader_identity(ReadersConfig()) == (0, 1, "127.0.0.1", 0)
    monkeypatch.setenv("TML_READER_BIND", "0.0.0.0:7000")   # only when configured so
    assert roles.reader_identity(ReadersConfig()) == (0, 1, "0.0.0.0", 7000)
