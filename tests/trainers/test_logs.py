"""What is kept of a Trainer's temporary output folder: its log history and report_to folders, not checkpoints."""

from modpo_trl.trainers.logs import keep_logs


def test_logs_are_copied_and_checkpoints_are_not(tmp_path):
    work, folder = tmp_path / "work", tmp_path / "adapter"
    (work / "runs" / "May01_host").mkdir(parents=True)
    (work / "runs" / "May01_host" / "events.out.tfevents.1").write_text("tb")
    (work / "checkpoint-2").mkdir()
    (work / "checkpoint-2" / "trainer_state.json").write_text("{}")
    (work / "trainer_state.json").write_text('{"log_history": []}')
    (work / "emissions.csv").write_text("duration,emissions\n")
    (work / "README.md").write_text("TRL's checkpoint card")
    (folder / "runs" / "Apr30_host").mkdir(parents=True)  # a run before a resume
    assert keep_logs(work, folder) == ["trainer_state.json", "runs", "emissions.csv"]
    assert sorted(p.name for p in folder.iterdir()) == ["emissions.csv", "runs", "trainer_state.json"]
    assert sorted(p.name for p in (folder / "runs").iterdir()) == ["Apr30_host", "May01_host"]
    assert (folder / "runs" / "May01_host" / "events.out.tfevents.1").read_text() == "tb"
    assert (work / "trainer_state.json").is_file()  # copied: the work folder can still resume
    assert keep_logs(tmp_path / "nothing", folder) == []
