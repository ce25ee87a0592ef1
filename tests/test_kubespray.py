"""Kubespray's checkout and venv: resolved from the config, built once into the cache, checked against the pin."""

from __future__ import annotations

import multiprocessing
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

from gpuforge.config import ConfigError, load_config
from tasks import kubespray
from tasks.ansible import PlaybookRun
from tasks.ansible_tasks import count_plays
from tasks.kubespray import KubesprayError, _build_once, kubespray_venv, resolve_checkout, what_kubespray_did

UPSTREAM = Path(__file__).resolve().parents[2] / "shared" / "upstream"


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("GPUFORGE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def make_tree(root: Path, version: str = "2.31.0", requirements: str = "# none\n") -> Path:
    root.mkdir(parents=True)
    (root / "cluster.yml").write_text("- import_playbook: playbooks/cluster.yml\n")
    (root / "galaxy.yml").write_text(f"namespace: kubernetes_sigs\nname: kubespray\nversion: {version}\n")
    (root / "requirements.txt").write_text(requirements)
    return root


def make_tarball(tmp_path: Path, version: str = "2.31.0", top: str = "kubespray-2.31.0") -> Path:
    tree = make_tree(tmp_path / "src" / version / top, version)
    out = tmp_path / f"{top}-{version}.tar.gz"
    with tarfile.open(out, "w:gz") as tar:
        tar.add(tree, arcname=top)
    return out


def test_tarball_is_extracted_once_into_the_cache_keyed_by_its_sha256(tmp_path, cache):
    tarball = make_tarball(tmp_path)
    checkout = resolve_checkout(tarball, "v2.31.0")
    assert checkout.parent == cache / "kubespray" and len(checkout.name) == 16
    assert (checkout / "cluster.yml").is_file()  # the top folder is stripped
    inode = checkout.stat().st_ino
    assert resolve_checkout(tarball, "v2.31.0").stat().st_ino == inode  # not extracted again
    assert sorted(p.name for p in checkout.parent.iterdir()) == [checkout.name, f"{checkout.name}.lock"]


def test_checkout_of_another_version_is_refused(tmp_path):
    with pytest.raises(KubesprayError, match=r"is Kubespray v2\.30\.0, but kubespray\.version is v2\.31\.0"):
        resolve_checkout(make_tarball(tmp_path, "2.30.0"), "v2.31.0")
    with pytest.raises(KubesprayError, match="does not say which Kubespray it is"):
        tree = make_tree(tmp_path / "stand-in")
        (tree / "galaxy.yml").unlink()
        resolve_checkout(tree, "v2.31.0")


@pytest.mark.skipif(not (UPSTREAM / "previous" / "kubespray-v2.30.0.tar.gz").exists(), reason="no upstream tarballs")
def test_the_real_previous_release_is_not_taken_for_the_pin():
    with pytest.raises(KubesprayError, match=r"is Kubespray v2\.30\.0"):
        resolve_checkout(UPSTREAM / "previous" / "kubespray-v2.30.0.tar.gz", "v2.31.0")


def test_folder_checkout_is_used_in_place_and_must_be_kubespray(tmp_path):
    tree = make_tree(tmp_path / "kubespray")
    assert resolve_checkout(tree, "v2.31.0") == tree
    (tree / "cluster.yml").unlink()
    with pytest.raises(KubesprayError, match="not a Kubespray tree"):
        resolve_checkout(tree, "v2.31.0")
    with pytest.raises(KubesprayError, match="neither a Kubespray tree"):
        resolve_checkout(tmp_path / "missing.zip", "v2.31.0")


def test_unset_checkout_clones_the_tag_or_says_how_to_do_without_github(tmp_path, monkeypatch, cache):
    monkeypatch.setattr(kubespray, "KUBESPRAY_GIT", str(tmp_path / "no-such-repo"))
    with pytest.raises(KubesprayError, match=r"could not clone Kubespray v2\.31\.0 .*set kubespray\.checkout"):
        resolve_checkout(None, "v2.31.0")
    assert not (cache / "kubespray" / "v2.31.0").exists() and not list((cache / "kubespray").glob(".v2.31.0.*"))
    # A repository with the tag (here a local one, as GitHub would serve it) is cloned into the cache once.
    repo = make_tree(tmp_path / "repo")
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    for args in (["init", "-q"], ["add", "."], ["commit", "-qm", "v2.31.0"], ["tag", "v2.31.0"]):
        subprocess.run(git + args, check=True, capture_output=True)
    monkeypatch.setattr(kubespray, "KUBESPRAY_GIT", f"file://{repo}")
    assert resolve_checkout(None, "v2.31.0") == cache / "kubespray" / "v2.31.0"


def _slow_build(marker: str):
    def build(tmp: Path) -> Path:
        with open(marker, "a") as fh:
            fh.write("built\n")
        time.sleep(0.5)
        (tmp / "tree").mkdir()
        (tmp / "tree" / "done").write_text("yes")
        return tmp / "tree"

    return build


def _build_in_process(final: str, marker: str) -> None:
    _build_once(Path(final), _slow_build(marker))


def test_concurrent_runs_build_a_cache_entry_once(tmp_path):
    final, marker = tmp_path / "entry", tmp_path / "builds"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_build_in_process, args=(str(final), str(marker))) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert marker.read_text() == "built\n" and (final / "done").read_text() == "yes"


def test_a_build_that_died_leaves_nothing_the_next_run_trusts(tmp_path):
    final = tmp_path / "entry"

    def dies(tmp: Path) -> Path:
        (tmp / "half").write_text("")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _build_once(final, dies)
    (tmp_path / ".entry.crashed").mkdir()  # as a killed process would leave it
    assert not final.exists() and sorted(p.name for p in tmp_path.iterdir()) == [".entry.crashed", "entry.lock"]
    _build_once(final, _slow_build(str(tmp_path / "builds")))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["builds", "entry", "entry.lock"]


def test_venv_is_built_once_per_requirements_file(tmp_path, cache, monkeypatch):
    tree = make_tree(tmp_path / "kubespray")
    venv = kubespray_venv(tree)
    assert (venv / "bin" / "python").exists() and (venv / "bin" / "pip").exists()
    link = next((cache / "kubespray-venv").glob("[0-9a-f]*[0-9a-f]"))
    assert link.is_symlink() and link.resolve() == venv  # the venv keeps its build path; the link is published
    assert kubespray_venv(tree) == venv
    monkeypatch.setattr(kubespray, "_venv", lambda requirements: lambda tmp: tmp)  # no second real build
    (tree / "requirements.txt").write_text("# changed\n")
    assert kubespray_venv(tree) != venv


def test_venv_that_cannot_install_says_what_to_do(tmp_path):
    tree = make_tree(tmp_path / "kubespray", requirements="./no-such-package-dir\n")
    with pytest.raises(KubesprayError, match="PIP_INDEX_URL or PIP_FIND_LINKS .* or kubespray.venv"):
        kubespray_venv(tree)


def test_summary_says_what_kubespray_did_from_the_checkout_tasks_that_ran(tmp_path):
    checkout = make_tree(tmp_path / "kubespray")
    files = {
        f"{checkout}/roles/dynamic_groups/tasks/main.yml",
        f"{checkout}/roles/validate_inventory/tasks/main.yml",
        f"{checkout}/playbooks/internal_facts.yml",
        "/repo/lab/kubespray/lab-cluster.yml",  # the playbook's own tasks are not Kubespray's
    }
    run = PlaybookRun("successful", 0, {}, {}, files, {"gpuforge_notes": ["node provisioning simulated by the lab"]})
    assert what_kubespray_did(run, checkout, "v2.31.0") == (
        "validated and facts gathered by Kubespray v2.31.0; node provisioning simulated by the lab"
    )
    run.task_files = {f"{checkout}/roles/kubernetes/node/tasks/main.yml", "/repo/lab/kubespray/lab-cluster.yml"}
    run.custom_stats = {}
    assert what_kubespray_did(run, checkout, "v2.31.0") == "nothing by Kubespray v2.31.0 (also ran: roles/kubernetes)"


def test_plays_are_counted_through_an_import_named_by_a_variable(tmp_path):
    checkout = make_tree(tmp_path / "kubespray")
    (checkout / "playbooks").mkdir()
    (checkout / "playbooks" / "facts.yml").write_text("- hosts: all\n- hosts: k8s_cluster\n")
    wrapper = tmp_path / "lab.yml"
    wrapper.write_text(
        "- hosts: localhost\n- import_playbook: '{{ gpuforge_kubespray_dir }}/playbooks/facts.yml'\n- hosts: all\n"
    )
    assert count_plays(wrapper, {"gpuforge_kubespray_dir": str(checkout)}) == 4
    assert count_plays(wrapper) == 2


def test_config_playbook_is_the_checkout_s_unless_it_is_a_path_of_its_own(tmp_path):
    path = tmp_path / "config.yml"
    base = "k8s_cluster_nodes: [{ip: 10.0.0.1, role: [control-plane, etcd, schedulable]}]\nkubespray:\n"
    path.write_text(base + "  playbook: scale.yml\n")
    assert not load_config(path).kubespray.own_playbook()
    path.write_text(base + "  playbook: ../site/lab.yml\n  skip_tags: [bootstrap_os]\n")
    config = load_config(path)
    assert config.kubespray.own_playbook() and config.kubespray.skip_tags == ["bootstrap_os"]
    path.write_text(base + "  playbook: cluster\n")
    with pytest.raises(ConfigError, match="is not a playbook"):
        load_config(path)
