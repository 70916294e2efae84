"""A package is untrusted input (issue 13): every row of the hostile-user report, each a clear one-line error
(or a safe result), nothing left behind, never an ``internal error``."""

import hashlib
import json
import os
import shutil
import struct

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from deltacomp.apply import apply
from deltacomp.cli import cli
from deltacomp.errors import CheckpointError, MismatchError, OutputError, PackageError
from deltacomp.io.checkpoint import Checkpoint
from deltacomp.io.output import atomic_dir
from deltacomp.package.store import DeltaPackage
from deltacomp.publish import verify_folder

COMPRESSED = "model.layers.0.self_attn.q_proj.weight"
EXACT = "model.layers.0.input_layernorm.weight"


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def assert_clean_failure(result, *needles, out=None):
    assert result.exit_code != 0, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "internal error" not in lines[0], lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]
    if out is not None:
        assert not out.exists()
        assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def pkg(tmp_path, llama_packages):
    """A private copy of the tiny Llama package at 1 bit."""
    return shutil.copytree(llama_packages(1.0), tmp_path / "pkg")


def manifest_of(pkg):
    return json.loads((pkg / "deltacomp.json").read_text())


def edit_manifest(pkg, fn):
    m = manifest_of(pkg)
    fn(m)
    (pkg / "deltacomp.json").write_text(json.dumps(m))


def edit_tensors(pkg, fn, fname="delta.safetensors"):
    """Change the stored tensors, then recompute the file's sha256 in the manifest (a deliberate forgery)."""
    path = pkg / fname
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, path)
    edit_manifest(pkg, lambda m: m["files"].__setitem__(fname, sha(path)))


def list_file(pkg, rel, path=None):
    edit_manifest(pkg, lambda m: m["files"].__setitem__(rel, sha(path or pkg / rel)))


# -- path and file confinement --------------------------------------------------------------------------------------
@pytest.mark.parametrize("rel", ["../outside.safetensors", "/etc/hostname", "model/../../x", "a\\..\\b", ""])
def test_manifest_file_paths_must_stay_inside(pkg, tmp_path, llama_pair, rel):
    target = tmp_path / "outside.safetensors"
    shutil.copyfile(pkg / "delta.safetensors", target)
    edit_manifest(pkg, lambda m: m["files"].__setitem__(rel, sha(target)))
    assert_clean_failure(run("inspect", pkg), "files[")
    out = tmp_path / "model"
    assert_clean_failure(run("apply", pkg, "--base", llama_pair[0], "-o", out), "files[", out=out)


def test_a_symlink_out_of_the_package_is_refused(pkg, tmp_path):
    secret = tmp_path / "secret.json"
    secret.write_text('{"a": 1}')
    (pkg / "model" / "tokenizer.json").symlink_to(secret)
    list_file(pkg, "model/tokenizer.json", secret)
    assert_clean_failure(run("inspect", pkg), "symlink", "tokenizer.json")


def test_pull_verification_never_probes_local_files(pkg):
    hostname = "/etc/hostname"
    if not os.path.isfile(hostname):
        pytest.skip("no /etc/hostname")
    edit_manifest(pkg, lambda m: m["files"].__setitem__(hostname, hashlib.sha256(open(hostname, "rb").read())
                                                         .hexdigest()))
    with pytest.raises(PackageError, match="absolute"):
        verify_folder(pkg, "team/evil")


def test_push_of_a_package_listing_outside_paths_writes_nothing(pkg, tmp_path):
    marker = tmp_path / "x" / "marker.txt"
    marker.parent.mkdir()
    marker.write_text("m")
    edit_manifest(pkg, lambda m: m["files"].__setitem__("../../x/marker.txt", sha(marker)))
    before = sorted(p.name for p in tmp_path.iterdir())
    assert_clean_failure(run("push", pkg, "team/tiny"), "../../x/marker.txt")
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_shard_index_is_confined_and_must_be_an_object(tmp_path, llama_sharded_pair, llama_pair):
    base = shutil.copytree(llama_sharded_pair[0], tmp_path / "base")
    index = base / "model.safetensors.index.json"
    good = json.loads(index.read_text())
    name = next(iter(good["weight_map"]))
    good["weight_map"][name] = "../../../" + good["weight_map"][name]
    index.write_text(json.dumps(good))
    out = tmp_path / "pkg"
    assert_clean_failure(run("compress", base, llama_sharded_pair[1], "-o", out), "weight_map", "..", out=out)
    index.write_text("[1, 2]")
    assert_clean_failure(run("compress", base, llama_sharded_pair[1], "-o", out), "shard index", out=out)


def test_side_files_equal_to_the_base_come_from_the_base_checked(pkg, tmp_path, llama_pair):
    base, ft = llama_pair[0], llama_pair[1]
    assert "generation_config.json" in manifest_of(pkg)["base_files"]
    assert not (pkg / "model" / "generation_config.json").exists()
    out = tmp_path / "out"
    assert run("apply", pkg, "--base", base, "-o", out).exit_code == 0
    for rel in ("generation_config.json", "config.json"):
        assert (out / rel).read_bytes() == (ft / rel).read_bytes()
    other = shutil.copytree(base, tmp_path / "base2")  # the same weights, another generation config
    (other / "generation_config.json").write_text('{"temperature": 0.1}')
    assert_clean_failure(run("apply", pkg, "--base", other, "-o", tmp_path / "o2"), "generation_config.json",
                         "relies on the base's", out=tmp_path / "o2")
    (other / "generation_config.json").unlink()
    assert_clean_failure(run("apply", pkg, "--base", other, "-o", tmp_path / "o3"), "does not have",
                         out=tmp_path / "o3")


def test_apply_copies_only_listed_side_files(pkg, tmp_path, llama_pair):
    base = llama_pair[0]
    honest = tmp_path / "honest"
    apply(pkg, base, honest, progress=False)
    (pkg / "model").mkdir(exist_ok=True)
    shutil.copyfile(base / "model.safetensors", pkg / "model" / "model.safetensors")  # unlisted: the base itself
    (pkg / "model" / "evil.py").write_text("import os\n")
    (tmp_path / "target.txt").write_text("secret")
    (pkg / "model" / "vocab.txt").symlink_to(tmp_path / "target.txt")
    out = tmp_path / "out"
    r = run("apply", pkg, "--base", base, "-o", out)
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in honest.iterdir())
    assert (out / "model.safetensors").read_bytes() == (honest / "model.safetensors").read_bytes()
    list_file(pkg, "model/evil.py")  # listed, but not a config or tokenizer file: still not copied
    out2 = tmp_path / "out2"
    assert run("apply", pkg, "--base", base, "-o", out2).exit_code == 0
    assert not (out2 / "evil.py").exists()


# -- the manifest schema ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("edit, key", [
    (lambda m: m.__setitem__("format_version", "1"), "format_version"),
    (lambda m: m.__setitem__("format_version", None), "format_version"),
    (lambda m: m.__setitem__("base_files", {"../../etc/passwd": "0" * 64}), "base_files"),
    (lambda m: m.__setitem__("base_files", {"config.json": "zz"}), "base_files"),
    (lambda m: m.__setitem__("base_files", []), "base_files"),
    (lambda m: m.__setitem__("files", list(m["files"])), "files"),
    (lambda m: m.__setitem__("modules", list(m["modules"])), "modules"),
    (lambda m: m["modules"][COMPRESSED].__setitem__("shape", [64, -1]), f"modules.{COMPRESSED}.shape"),
    (lambda m: m["modules"][COMPRESSED]["info"]["groups"][0].__setitem__("bits", 5),
     f"modules.{COMPRESSED}.info.groups[0].bits"),
    (lambda m: m["modules"][COMPRESSED]["info"]["groups"][0].__setitem__("bits", 99),
     f"modules.{COMPRESSED}.info.groups[0].bits"),
    (lambda m: m["modules"][COMPRESSED]["info"].__setitem__("rank", 3), f"modules.{COMPRESSED}.info.rank"),
    (lambda m: m["modules"][COMPRESSED].pop("info"), f"modules.{COMPRESSED}.info"),
    (lambda m: m["modules"][COMPRESSED].__setitem__("dtype", "I8"), f"modules.{COMPRESSED}"),
    (lambda m: m["modules"][EXACT].__setitem__("dtype", "I8"), f"modules.{EXACT}"),
    (lambda m: m["modules"][EXACT].__setitem__("dtype", "F16"), f"modules.{EXACT}"),
    (lambda m: m["modules"][EXACT].__setitem__("action", "zap"), f"modules.{EXACT}.action"),
    (lambda m: m["base"].__setitem__("fingerprint", 7), "base.fingerprint"),
    (lambda m: m["totals"].__setitem__("package_tensor_bytes", "many"), "totals.package_tensor_bytes"),
    (lambda m: m["budget"].__setitem__("bits_per_entry", float("nan")), "budget.bits_per_entry"),
])
def test_manifest_schema_names_the_key(pkg, edit, key):
    edit_manifest(pkg, edit)
    assert_clean_failure(run("inspect", pkg), key)


def test_stored_tensors_must_match_the_manifest(pkg, tmp_path, llama_pair):
    base, out = llama_pair[0], tmp_path / "model"
    cases = [
        (lambda t: t.__setitem__(EXACT, torch.zeros(10)), EXACT),  # stored whole, wrong shape
        (lambda t: t.__setitem__(EXACT, t[EXACT].half()), EXACT),  # fp16 where the manifest says F32
        (lambda t: t.__setitem__(f"{COMPRESSED}/g0.u", t[f"{COMPRESSED}/g0.u"][:, :-1].contiguous()), "g0.u"),
        (lambda t: t.__setitem__(f"{COMPRESSED}/g1.s", t[f"{COMPRESSED}/g1.s"][:-1].contiguous()), "g1.s"),
        (lambda t: t.__setitem__("stray", torch.zeros(3)), "stray"),
    ]
    for edit, needle in cases:
        fresh = shutil.copytree(pkg, tmp_path / "case", dirs_exist_ok=False)
        edit_tensors(fresh, edit)
        assert_clean_failure(run("apply", fresh, "--base", base, "-o", out), needle, out=out)
        shutil.rmtree(fresh)


@pytest.mark.parametrize("key, value", [(EXACT, float("nan")), (f"{COMPRESSED}/g0.s", float("inf"))])
def test_non_finite_stored_values_are_refused(pkg, tmp_path, llama_pair, key, value):
    edit_tensors(pkg, lambda t: t[key].fill_(value))
    out = tmp_path / "model"
    assert_clean_failure(run("apply", pkg, "--base", llama_pair[0], "-o", out), "NaN or Inf", out=out)


def test_absurd_compressed_values_are_refused(pkg, tmp_path, llama_pair):
    def huge(t):
        s = t[f"{COMPRESSED}/g0.s"].float()
        s[0] = 1e30
        t[f"{COMPRESSED}/g0.s"] = s

    edit_tensors(pkg, huge)
    out = tmp_path / "model"
    assert_clean_failure(run("apply", pkg, "--base", llama_pair[0], "-o", out), COMPRESSED, out=out)


def _raw_header(path, fn):
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    fn(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])


def test_safetensors_header_with_a_negative_dimension(pkg):
    def negative(h):
        key = next(k for k in h if k != "__metadata__")
        begin, end = h[key]["data_offsets"]
        h[key]["shape"] = [-(end - begin) // 4]
        h[key]["data_offsets"] = [end, begin]

    _raw_header(pkg / "delta.safetensors", negative)
    list_file(pkg, "delta.safetensors")
    assert_clean_failure(run("inspect", pkg), "corrupt safetensors entry")


def test_config_json_that_is_a_list(tmp_path, llama_pair):
    ft = shutil.copytree(llama_pair[1], tmp_path / "ft")
    (ft / "config.json").write_text("[1, 2, 3]")
    out = tmp_path / "pkg"
    assert_clean_failure(run("compress", llama_pair[0], ft, "-o", out), "config.json", "JSON object", out=out)


@pytest.mark.parametrize("args, needle", [
    (["--max-length", "-5"], "--max-length"), (["--batch-size", "0"], "--batch-size"),
    (["--device", "cuda:7"], "--device"), (["--device", "gpu"], "--device")])
def test_eval_option_checks(llama_packages, llama_pair, args, needle):
    if args[-1] == "cuda:7" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has 8 GPUs")
    base, ft, _ = llama_pair
    assert_clean_failure(run("eval", llama_packages(1.0), "--base", base, "--finetuned", ft, *args), needle)


def test_eval_device_cuda_without_a_gpu(llama_packages, llama_pair):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    base, ft, _ = llama_pair
    assert_clean_failure(run("eval", llama_packages(1.0), "--base", base, "--finetuned", ft, "--device", "cuda"),
                         "no CUDA GPU")


def test_full_fingerprint_digests_stay_what_packages_recorded():
    """Packages record these digests: a float tensor's is its bf16 rounding's, whatever its dtype."""
    from deltacomp.package.fingerprint import FullFingerprint

    t = torch.arange(12, dtype=torch.float32).reshape(3, 4) / 7
    want = "8a950a2080fb4a5bf6cd5c80b5078d80e07143a268f44745eaed16528cf0412e"
    assert {FullFingerprint.digest("m.weight", t.to(d)).hex() for d in (torch.float32, torch.float16,
                                                                            torch.bfloat16)} == {want}
    assert FullFingerprint.digest("m.weight", t.T).hex() != want  # the shape and the order count
    assert FullFingerprint.digest("ids", torch.arange(5)).hex() == (
        "53fbf56409e029d1495a19291d548423f9df5b624932d103403c63ffdac1f21b")


def test_full_fingerprint_catches_a_base_changed_between_samples(pkg, tmp_path, llama_pair):
    base = shutil.copytree(llama_pair[0], tmp_path / "base")
    tensors = load_file(base / "model.safetensors")
    name = "model.layers.1.mlp.up_proj.weight"  # 10240 values; the sampled fingerprint reads 64 of them
    flat = tensors[name].reshape(-1)
    sampled = {round(i * (flat.numel() - 1) / 63) for i in range(64)}
    others = torch.tensor([i for i in range(flat.numel()) if i not in sampled])
    flat[others[::2]] += 0.5
    save_file(tensors, base / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "model"
    assert_clean_failure(run("apply", pkg, "--base", base, "-o", out), "full fingerprint", out=out)


def test_module_records_are_checked_against_the_base(pkg, tmp_path, llama_pair):
    edit_manifest(pkg, lambda m: m["modules"].__setitem__("model.embed_tokens.weight", {
        "action": "added", "shape": [256, 64], "dtype": "F32"}))
    edit_tensors(pkg, lambda t: t.__setitem__("model.embed_tokens.weight", torch.zeros(256, 64)))
    out = tmp_path / "model"
    with pytest.raises(MismatchError, match="already has it"):
        apply(pkg, llama_pair[0], out, progress=False)


# -- outputs ---------------------------------------------------------------------------------------------------------
def test_outputs_never_replace_an_input(tmp_path, llama_pair, llama_packages):
    base0, ft0, _ = llama_pair
    base, ft = shutil.copytree(base0, tmp_path / "base"), shutil.copytree(ft0, tmp_path / "ft")
    before = {p.name: p.read_bytes() for p in ft.iterdir()}
    assert_clean_failure(run("compress", base, ft, "-o", ft, "--overwrite"), "input")
    assert_clean_failure(run("compress", base, ft, "-o", tmp_path, "--overwrite"), "input")
    assert {p.name: p.read_bytes() for p in ft.iterdir()} == before
    pkg = llama_packages(1.0)
    assert_clean_failure(run("apply", pkg, "--base", base, "-o", base, "--overwrite"), "input")
    (base / "sub").mkdir()
    assert_clean_failure(run("apply", pkg, "--base", base, "-o", base / "sub", "--overwrite"), "inside the input")
    assert run("apply", pkg, "--base", base, "-o", base / "new").exit_code == 0  # a new subfolder is fine


def test_overwrite_replaces_only_a_previous_output_of_the_same_kind(tmp_path, llama_pair, llama_packages):
    base, pkg = llama_pair[0], llama_packages(1.0)
    mine = tmp_path / "demo" / "model"  # what demo -o demo would overwrite
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="not a previous deltacomp model"):
        apply(pkg, base, mine, overwrite=True, progress=False)
    assert (mine / "notes.txt").read_text() == "mine"
    assert_clean_failure(run("compress", base, llama_pair[1], "-o", mine, "--overwrite"),
                         "not a previous deltacomp package")
    model = tmp_path / "model"
    apply(pkg, base, model, progress=False)
    apply(pkg, base, model, overwrite=True, progress=False)  # a previous model output: replaced
    assert_clean_failure(run("compress", base, llama_pair[1], "-o", model, "--overwrite"),
                         "not a previous deltacomp package")


def test_the_final_rename_rechecks(tmp_path):
    dest = tmp_path / "out"
    with pytest.raises(OutputError, match="changed while this run worked"):
        with atomic_dir(dest, False, "model") as tmp:
            (tmp / "w").write_text("new")
            dest.mkdir()  # another command finished first
            (dest / "w").write_text("theirs")
    assert (dest / "w").read_text() == "theirs"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_symlinked_output_permissions_and_stale_leftovers(tmp_path, llama_pair, llama_packages):
    base, pkg = llama_pair[0], llama_packages(1.0)
    real = tmp_path / "real"
    apply(pkg, base, real, progress=False)
    link = tmp_path / "link"
    link.symlink_to(real)
    stale = tmp_path / ".real.partial-999999999-abc"  # a killed run's folder (no such pid)
    stale.mkdir()
    (stale / ".model-shard-00000.safetensors.spool").write_bytes(b"x" * 100)
    assert run("apply", pkg, "--base", base, "-o", link, "--overwrite").exit_code == 0
    assert link.is_symlink() and (real / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]
    mask = os.umask(0)
    os.umask(mask)
    assert (real.stat().st_mode & 0o777) == (0o777 & ~mask)


def test_scratch_folders_of_killed_runs_are_removed(tmp_path, monkeypatch):
    import tempfile

    from deltacomp.io.output import scratch_dir

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = tmp_path / "deltacomp-eval-999999999-x"  # an eval killed with SIGKILL (no such pid)
    mine = tmp_path / f"deltacomp-eval-{os.getpid()}-y"
    other = tmp_path / "deltacomp-push-999999999-z"
    for d in (dead, mine, other):
        d.mkdir()
    with scratch_dir("eval") as tmp:
        assert tmp.is_dir() and tmp.name.startswith(f"deltacomp-eval-{os.getpid()}-")
    assert not dead.exists() and mine.exists() and other.exists() and not tmp.exists()


def test_sigterm_unwinds_like_ctrl_c():
    from deltacomp.cli import _sigterm

    with pytest.raises(KeyboardInterrupt):
        _sigterm(15, None)


def test_no_local_absolute_paths_in_manifest_or_card(llama_packages, llama_pair):
    pkg = llama_packages(1.0)
    for name in ("deltacomp.json", "README.md"):
        text = (pkg / name).read_text()
        for src in llama_pair[:2]:
            assert str(src) not in text and str(src.parent) not in text, name
    base = manifest_of(pkg)["base"]
    assert base["source"] == "base" and base["full_fingerprint"].startswith("sha256:")


# -- checkpoints ----------------------------------------------------------------------------------------------------
def test_legacy_bin_checkpoint_is_read(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    torch.save({"w": torch.arange(6.0).reshape(2, 3)}, tmp_path / "pytorch_model.bin",
               _use_new_zipfile_serialization=False)
    assert torch.equal(Checkpoint(tmp_path).read("w"), torch.arange(6.0).reshape(2, 3))


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_code_executing_pickle_is_refused_in_one_line(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    torch.save({"w": _Exploit()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError) as e:
        Checkpoint(tmp_path)
    assert "\n" not in str(e.value) and "weights_only=False" not in str(e.value)
    assert not (tmp_path / "pwned").exists()


def test_a_package_opens_and_its_tensors_match(pkg):
    p = DeltaPackage(pkg)
    assert p.file("delta.safetensors") == pkg / "delta.safetensors"


# -- silent oddities ------------------------------------------------------------------------------------------------
def test_identical_models_and_an_include_matching_nothing_are_said(tmp_path, llama_pair):
    base, ft, _ = llama_pair
    out = tmp_path / "pkg"
    assert_clean_failure(run("compress", base, base, "-o", out), "same weights", out=out)
    assert_clean_failure(run("compress", base, ft, "-o", out, "--include", "nothing_matches"), "--include",
                         "matches no", out=out)


def test_demo_refuses_a_users_folder_before_any_work(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "mine.txt").write_text("mine")
    assert_clean_failure(run("demo", "-o", tmp_path), "already exists")
    assert_clean_failure(run("demo", "-o", tmp_path, "--overwrite"), "not a previous deltacomp model")
    assert (tmp_path / "model" / "mine.txt").read_text() == "mine"


def test_binary_calibration_file_is_refused(tmp_path, llama_tok):
    base, ft, _ = llama_tok
    garbage = tmp_path / "calib.txt"
    garbage.write_bytes(bytes(range(256)) * 64)
    out = tmp_path / "pkg"
    assert_clean_failure(run("compress", base, ft, "-o", out, "--calib", garbage), "not UTF-8 text", out=out)


def test_one_huge_calibration_line_is_cut_before_tokenizing(tmp_path):
    from conftest import byte_tokenizer

    from deltacomp.calib.data import load_samples

    line = tmp_path / "calib.txt"
    line.write_text("word " * 400_000 + "\n")  # 2 MB on one line
    samples = load_samples(line, byte_tokenizer(), max_len=128)
    assert len(samples) == 1 and samples[0].numel() == 128
