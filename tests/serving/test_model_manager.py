import shutil

from serving import model_manager


def test_version_folders_are_parsed_strictly_and_failed_loads_retried(exported, tmp_path):
    base = tmp_path / "m"
    shutil.copytree(exported["version"], base / "1")
    for odd in ("²", "016", "٣"):  # not canonical decimal names: ignored, polling survives
        shutil.copytree(exported["version"], base / odd)
    manager = model_manager.ModelManager("deep_retrieval", str(base), poll_seconds=0)
    assert model_manager._versions(str(base)) == [1] and manager.current.version == 1
    # A copy that lands saved_model.pb before variables/ fails once ...
    (base / "3").mkdir()
    shutil.copy(base / "1" / "saved_model.pb", base / "3" / "saved_model.pb")
    manager.refresh()
    assert manager.current.version == 1 and 3 in manager.failed
    manager.refresh()  # unchanged: not tried again
    # ... and loads once the copy is complete.
    shutil.copytree(base / "1" / "variables", base / "3" / "variables")
    manager.refresh()
    assert manager.current.version == 3 and 3 not in manager.failed
