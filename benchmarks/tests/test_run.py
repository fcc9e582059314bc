"""The `make bench` table: the rows, then how each row with a target was measured."""

from benchmarks.run import print_table
from benchmarks.timing import Row


def test_the_table_ends_with_the_notes_of_the_rows_with_a_target(capsys):
    print_table([Row("XL/2 ours vs naive", 15.0, 24.0, 1.6, ">= 1.6", "s", "per round 1.58–1.65 over 3 rounds"),
                 Row("peak RSS", 3.0, 2.0, 1.5, None, "GB", "a note without a target")])
    out = capsys.readouterr().out
    table, notes = out.split("notes on the rows with a target:")
    assert "XL/2 ours vs naive" in table and "peak RSS" in table
    assert "XL/2 ours vs naive: per round 1.58–1.65 over 3 rounds" in notes
    assert "a note without a target" not in out
