import pytest

from keras_vmoe import cli


def test_bad_argument_is_one_line_and_exit_2(capsys):
    assert cli.main(["demo", "--steps", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "keras-vmoe demo: error: --steps must be >= 1, got 0."


def test_unknown_command_exits_2():
    with pytest.raises(SystemExit) as info:
        cli.main(["no-such-command"])
    assert info.value.code == 2


def test_help_lists_every_command_with_its_summary(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for name in cli._COMMANDS:
        assert f"    {name} " in out
    assert "List the built-in presets with their parameter count" in out


def test_command_help_has_its_arguments(capsys):
    with pytest.raises(SystemExit):
        cli.main(["presets", "--help"])
    assert "--filter FILTER" in capsys.readouterr().out


def test_released_sizes_table_matches_the_cost_model():
    # `keras-vmoe presets` reads the stored table; it must be what the cost
    # model and the converter compute today.
    from keras_vmoe.cli import released_sizes

    assert released_sizes.RELEASED_SIZES == released_sizes.compute_released_sizes()
