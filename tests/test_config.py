"""Settings: the shipped config.yaml, unknown keys, bad values, overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from batchsr.config import Settings, load_settings, load_train_settings
from batchsr.errors import ConfigError
from tests.conftest import REPO


def test_shipped_config_yaml_is_valid_and_equals_the_defaults():
    assert load_settings(REPO / "config.yaml") == Settings()


def test_unknown_key_is_named_with_the_allowed_ones(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("engine:\n  tiel: 64\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    message = str(info.value)
    assert "engine.tiel" in message and "tile" in message and str(path) in message


def test_unknown_section_is_named(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("engnie: {}\n")
    with pytest.raises(ConfigError, match="engnie"):
        load_settings(path)


@pytest.mark.parametrize(
    "text, key, value",
    [
        ("engine:\n  device: tpu\n", "engine.device", "'tpu'"),
        ("engine:\n  tile: 3\n", "engine.tile", "3"),
        ("engine:\n  precision: float8\n", "engine.precision", "'float8'"),
        ("run:\n  output_format: gif\n", "run.output_format", "'gif'"),
        # Values of another type are not converted: a quoted number or a flag where a count belongs is an edit gone wrong.
        ("engine:\n  tile: '64'\n", "engine.tile", "'64'"),
        ("engine:\n  batch_size: true\n", "engine.batch_size", "True"),
        ("run:\n  recursive: 1\n", "run.recursive", "1"),
        ("watch:\n  settle_s: '2'\n", "watch.settle_s", "'2'"),
    ],
)
def test_bad_value_names_key_value_and_what_is_allowed(tmp_path, text, key, value):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    message = str(info.value)
    assert key in message and value in message
    assert any(word in message for word in ("must be", "should be", "greater than", "Input should"))


def test_not_yaml_and_not_a_mapping(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("engine: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(path)
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_settings(path)


def test_duplicate_keys_and_non_utf8_files_are_refused_an_empty_section_is_defaults(tmp_path):
    dup = tmp_path / "dup.yaml"
    dup.write_text("engine:\n  tile: 64\n  overlap: 8\n  tile: 256\n")
    with pytest.raises(ConfigError, match="found the key 'tile' twice"):
        load_settings(dup)
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("run:\n  name_template: '{stem}_\xe9{ext}'\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_settings(latin)
    empty = tmp_path / "empty.yaml"
    empty.write_text("engine:\n  # tile: 64\nrun:\n  progress: none\n")
    assert load_settings(empty).engine == Settings().engine
    assert load_settings(empty, {"engine.tile": 64}).engine.tile == 64


def test_overrides_win_and_relative_weights_follow_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  weights: models/m.weights.h5\nengine:\n  tile: 64\n")
    settings = load_settings(path, {"engine.tile": 96, "engine.batch_size": None})
    assert settings.engine.tile == 96 and settings.engine.batch_size == 8
    assert settings.model.weights == tmp_path / "models" / "m.weights.h5"
    with pytest.raises(ConfigError, match="engine.overlap"):
        load_settings(path, {"engine.overlap": -1})


def test_empty_paths_and_control_characters_in_names_are_refused_by_key(tmp_path):
    """An empty inbox became the config file's folder; a NUL in name_template failed every image at write time."""
    path = tmp_path / "c.yaml"
    for text, key in [('watch:\n  inbox: ""\n', "watch.inbox"), ('model:\n  weights: " "\n', "model.weights"),
                      ('run:\n  name_template: "{stem}{ext}\\u0000"\n', "run.name_template")]:
        path.write_text(text)
        with pytest.raises(ConfigError, match=rf"{key} = .*(not be empty|control characters)"):
            load_settings(path)
    path.write_text("watch:\n  inbox: .\n")  # the config file's own folder, said so
    assert load_settings(path).watch.inbox == tmp_path


def test_training_configs_in_the_repository_are_valid():
    paths = sorted((REPO / "configs").glob("train_*.yaml"))
    assert paths
    for path in paths:
        settings = load_train_settings(path)
        assert all(isinstance(p, Path) and p.is_absolute() and p.is_dir() for p in settings.train_dirs), path


def test_training_paths_from_the_file_follow_it_and_flags_follow_the_current_folder(tmp_path, monkeypatch):
    (tmp_path / "cfg").mkdir()
    path = tmp_path / "cfg" / "t.yaml"
    path.write_text("train_dirs: [data]\nout_dir: runs/a\n")
    monkeypatch.chdir(tmp_path)
    assert load_train_settings(path).out_dir == tmp_path / "cfg" / "runs" / "a"
    assert load_train_settings(path, {"out_dir": Path("mine")}).out_dir == Path("mine")
    with pytest.raises(ConfigError, match=r"steps \(from the command line\) = 0"):
        load_train_settings(path, {"steps": 0})


def test_training_config_checks_consistency(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text("train_dirs: [a]\nsteps: 100\nwarmup_steps: 100\n")
    with pytest.raises(ConfigError, match="warmup_steps") as error:
        load_train_settings(path)
    # The message names the clashing keys, not the whole file's contents.
    assert str(error.value).splitlines()[1:] == ["  warmup_steps (100) must be below steps (100)"]


def test_step_schedule_keys_are_refused_under_cosine_and_checked_under_step(tmp_path):
    """Milestones given with the cosine schedule used to be ignored without a word."""
    path = tmp_path / "t.yaml"
    path.write_text("train_dirs: [a]\nsteps: 1000\nstep_milestones: [500]\n")
    with pytest.raises(ConfigError, match=r"step_milestones apply only to schedule: step \(schedule is cosine\)"):
        load_train_settings(path)
    path.write_text("train_dirs: [a]\nsteps: 1000\nschedule: cosine\nstep_gamma: 0.1\n")
    with pytest.raises(ConfigError, match="step_gamma apply only to schedule: step"):
        load_train_settings(path)
    for bad in ("[600, 300]", "[0, 500]", "[500, 1000]", "[300, 300]"):
        path.write_text(f"train_dirs: [a]\nsteps: 1000\nschedule: step\nstep_milestones: {bad}\n")
        with pytest.raises(ConfigError, match=r"step_milestones \(\[.*\]\) must increase strictly within 1..steps-1"):
            load_train_settings(path)
    path.write_text("train_dirs: [a]\nsteps: 1000\nschedule: step\nstep_milestones: [300, 600]\nstep_gamma: 0.1\n")
    assert load_train_settings(path).step_milestones == [300, 600]
    # Settings written out whole (every key, defaults included) read back: the defaults are no request.
    path.write_text("train_dirs: [a]\nsteps: 1000\nstep_milestones: []\nstep_gamma: 0.5\n")
    assert load_train_settings(path).schedule == "cosine"


def test_training_model_top_width_names_the_key_and_value(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text("train_dirs: [a]\nmodel: {top_width: 2}\n")
    with pytest.raises(ConfigError) as error:
        load_train_settings(path)
    assert "model.top_width" in str(error.value) and "2" in str(error.value) and "at least 4" in str(error.value)


def test_numbers_in_exponent_form_are_numbers(tmp_path):
    """YAML 1.1 reads 2e-4 as text; with strict types that would refuse the usual way to write a learning rate."""
    path = tmp_path / "t.yaml"
    path.write_text("train_dirs: [a]\nlr: 2e-4\nlr_min: 1E-6\n")
    settings = load_train_settings(path)
    assert (settings.lr, settings.lr_min) == (2e-4, 1e-6)
    config = tmp_path / "c.yaml"
    config.write_text("watch:\n  settle_s: 5e-1\nrun:\n  stream_megapixels: 1.6e1\n")
    loaded = load_settings(config)
    assert (loaded.watch.settle_s, loaded.run.stream_megapixels) == (0.5, 16.0)
    for text in ("engine:\n  overlap: ._e5\n", "logging:\n  level: 2024-13-45\n"):  # neither a number nor a date
        config.write_text(text)
        with pytest.raises(ConfigError):
            load_settings(config)


def test_paths_are_taken_as_written_even_where_yaml_sees_a_number_flag_or_date(tmp_path):
    """A folder named 1e5, 2024-01-01 or on is a folder, not 100000.0, a date or True."""
    config = tmp_path / "c.yaml"
    config.write_text("watch:\n  inbox: 1e5\n  reference: 2024-01-01\n  done: on\n  failed: 0x10\n"
                      "logging:\n  file: 12\nmodel:\n  weights: ~\n")
    loaded = load_settings(config)
    assert (loaded.watch.inbox, loaded.watch.reference, loaded.watch.done, loaded.watch.failed) == (
        tmp_path / "1e5", tmp_path / "2024-01-01", tmp_path / "on", tmp_path / "0x10")
    assert loaded.logging.file == tmp_path / "12" and loaded.model.weights is None
    train = tmp_path / "t.yaml"
    train.write_text("train_dirs: [2024, data, 3.5]\nval_dir: 1e5\nout_dir: yes\n")
    settings = load_train_settings(train)
    assert settings.train_dirs == [tmp_path / "2024", tmp_path / "data", tmp_path / "3.5"]
    assert (settings.val_dir, settings.out_dir) == (tmp_path / "1e5", tmp_path / "yes")
    config.write_text("engine:\n  tile: 1e2\n")  # a number where a number belongs stays one (and a float is refused)
    with pytest.raises(ConfigError, match="engine.tile = 100.0"):
        load_settings(config)


@pytest.mark.parametrize("value", ["[1.0, 1.5]", "[0.1]", "[0.8, 0.8]"])
def test_training_rescale_factors_are_checked(tmp_path, value):
    path = tmp_path / "t.yaml"
    path.write_text(f"train_dirs: [a]\nrescale: {value}\n")
    with pytest.raises(ConfigError, match=r"rescale \(\[") as error:
        load_train_settings(path)
    assert "distinct factors in 0.25..1.0" in str(error.value)


def test_what_yaml_makes_of_unquoted_text_is_explained_where_it_is(tmp_path):
    """`background: #000000` (a comment in YAML) said "= None: Input should be a valid string", `{stem}` a
    mapping, `{stem}{ext}` a parser dump "in <unicode string>"; a missing training key printed the whole file."""
    path = tmp_path / "c.yaml"
    cases = [
        ("image:\n  background: #000000\n", r"image.background = None: .*# is a comment; quote it"),
        ("run:\n  name_template: {stem}\n", r"run.name_template = \{'stem': None\}: .*mapping or list; quote it"),
        ("run:\n  name_template: {stem}{ext}\n", rf"{path}, line 2, column 24 is not valid YAML: .*must be quoted"),
        ("engine: 5\n", r"engine = 5: a section of keys belongs here"),
        ("run:\n  name_template: '{stem}'\n", r"run.name_template = .*without an extension .*end it with \{ext\}"),
        ("run:\n  name_template: '{stem}_x{scale:.1f}{ext}'\n", r"run.name_template = .*no number formats"),
        ("run:\n  name_template: 'v1.{stem}'\n", r"without an extension \('v1.a' for a.png\)"),  # photo.v2 gives v1.photo.v2
        ("run:\n  name_template: '{ext}'\n", r"must hold \{stem\}"),
        ("run:\n  name_template: '{{stem}}_x{scale}{ext}'\n", r"must hold \{stem\}"),
        ("[run]: 1\n", rf"{path}, line 1, column 1 is not valid YAML: a key must be a name"),
    ]
    for text, expected in cases:
        path.write_text(text)
        with pytest.raises(ConfigError, match=expected):
            load_settings(path)
    path.write_text("train_dir: [x]\nval_dir: null\n")
    with pytest.raises(ConfigError) as info:
        load_train_settings(path)
    assert "train_dirs: required, and not given" in str(info.value) and "train_dirs = {" not in str(info.value)
