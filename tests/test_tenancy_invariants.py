"""The tenancy boundary: every row is served by its own user's module or refused, no user id reaches outside its
folder, every registry operation is all or nothing (property-based over random lifecycles, plus each bad input)."""
import os

import pytest
import torch
from hypothesis import HealthCheck, assume, given, note, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, initialize, invariant, precondition, rule

from helpers import assert_rel_close, small_cfg
from peftu_kernels.generate import greedy
from peftu_kernels.t5 import T5
from peftu_kernels.tenancy import Engine, load_user, save_user
from peftu_kernels.tenancy.engine import StaleBatchError
from peftu_kernels.tenancy.ids import folder_name, user_of
from peftu_kernels.tenancy.store import UserStore
from tenancy_users import KINDS, make

CI = settings(deadline=None, derandomize=bool(os.environ.get("CI")), suppress_health_check=list(HealthCheck))
WEIRD_IDS = ["alice", "../victim", "/etc/passwd", "a/b", ".", "..", "A", "a", "é€😀", "x" * 300, "%2e", "con", " ",
             "\x00", "u~1"]

_MODEL = {}


def model():
    if "m" not in _MODEL:  # a T5 with prefix-friendly attention and odd sizes elsewhere
        _MODEL["m"] = T5.from_config(small_cfg("gated-untied", d_model=36, d_kv=12, num_heads=3), seed=7).eval()
    return _MODEL["m"]


R, L = 4, 6
G = torch.Generator().manual_seed(0)
IDS = torch.randint(3, 101, (R, L), generator=G)
DEC = torch.randint(3, 101, (R, 3), generator=G)
_ORACLE = {}


def alone(kind, seed):
    """Logits of a user of (kind, seed) served alone on the fixed rows (None: the base model)."""
    key = (kind, seed)
    if key not in _ORACLE:
        with torch.no_grad():
            if kind is None:
                _ORACLE[key] = model()(IDS, DEC)
            else:
                eng = Engine(model(), backend="reference")
                eng.register("solo", make(model().cfg, kind, seed))
                _ORACLE[key] = model()(IDS, DEC, peft=eng.batch(["solo"] * R))
    return _ORACLE[key]


def forward(eng, rows):
    with torch.no_grad():
        return model()(IDS[:len(rows)], DEC[:len(rows)], peft=eng.batch(rows))


# --- ids ---------------------------------------------------------------------------------------------------
@given(st.text(min_size=1, max_size=400))
@CI
def test_any_string_is_a_safe_id_that_maps_back(user):
    name = folder_name(user)
    assert name not in (".", "..") and "/" not in name and "\x00" not in name and not name.startswith(".")
    assert len(name.encode()) <= 255 and name == name.lower()
    assert user_of(name) in (user, None) and (user_of(name) is None) == ("~" in name)


@given(st.text(min_size=1, max_size=200), st.text(min_size=1, max_size=200))
@CI
def test_distinct_ids_get_distinct_folders(a, b):
    assume(a != b)
    assert folder_name(a) != folder_name(b)


def test_store_keeps_every_id_inside_its_root(tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "lora.safetensors").write_bytes(b"precious")
    store = UserStore(tmp_path / "store")
    mods = make(model().cfg, "lora", 1)
    for u in WEIRD_IDS + [str(victim), "../victim", "../../victim"]:
        store.save(u, mods)
        assert store.path(u).parent == store.root
        assert store.load(u)[0].config == mods[0].config
    assert sorted(store.users()) == sorted(set(WEIRD_IDS + [str(victim), "../victim", "../../victim"]))
    for u in store.users():
        store.remove(u)
    assert (victim / "lora.safetensors").read_bytes() == b"precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store", "victim"] and not list(store.root.iterdir())


def test_offload_and_remove_never_touch_files_outside(tmp_path):
    outside = tmp_path / "victim"
    outside.mkdir()
    (outside / "keep.txt").write_text("x")
    eng = Engine(model(), backend="reference", capacity=1, offload_dir=tmp_path / "off")
    for u in ("../victim", str(outside), "../../victim"):
        eng.register(u, make(model().cfg, "ia3", 3))
    eng.batch(["../victim"])
    for u in list(eng.users):
        eng.remove(u)
    assert [p.name for p in outside.iterdir()] == ["keep.txt"]
    assert all(p.is_relative_to(tmp_path / "off") for p in (tmp_path / "off").rglob("*"))


# --- batch handles -----------------------------------------------------------------------------------------
@pytest.fixture
def eng():
    e = Engine(model(), backend="reference")
    e.register("a", make(model().cfg, "lora", 1))
    e.register("b", make(model().cfg, "prompt", 2))
    return e


@pytest.mark.parametrize("change", ["remove", "replace", "reuse slot", "evict"])
def test_stale_handles_refuse_to_run(eng, change, tmp_path):
    if change == "evict":
        eng = Engine(model(), backend="reference", capacity=1, offload_dir=tmp_path)
        eng.register("a", make(model().cfg, "lora", 1))
        eng.register("b", make(model().cfg, "lora", 2))
    h = eng.batch(["a", None])
    ok = eng.batch(["b"])
    if change == "remove":
        eng.remove("a")
    elif change == "replace":
        eng.register("a", make(model().cfg, "lora", 5), replace=True)
    elif change == "reuse slot":
        eng.remove("a")
        eng.register("c", make(model().cfg, "lora", 9))
    else:
        ok = eng.batch(["b"])  # capacity 1: evicts "a"
    with pytest.raises(StaleBatchError, match="user 'a'"):
        model()(IDS[:2], DEC[:2], peft=h)
    with pytest.raises(StaleBatchError, match="user 'a'"):
        greedy(model(), IDS[:2], None, 2, peft=h)
    with torch.no_grad():  # a handle whose users did not move keeps serving, and correctly
        assert_rel_close(model()(IDS[:1], DEC[:1], peft=ok), alone("lora" if change == "evict" else "prompt", 2)[:1])


@pytest.mark.parametrize("rows", [1, 2, 4])
def test_handle_rows_must_match_the_input(eng, rows):
    h = eng.batch(["a", "b", None][:rows] + [None] * max(0, rows - 3))
    with pytest.raises(ValueError, match=f"built for {rows} rows, the input has 3"):
        model()(IDS[:3], DEC[:3], peft=h)


# --- all or nothing ----------------------------------------------------------------------------------------
def state(e):
    banks = {k: {s: {n: t.clone() for n, t in g.items()} for s, g in b.sites.items()} for k, b in e.banks.items()}
    files = sorted((str(p.relative_to(e.offload_dir)), p.read_bytes()) for p in e.offload_dir.rglob("*")
                   if p.is_file()) if e.offload_dir else []
    return banks, {u: dict(s) for u, s in e.slots.items()}, list(e.users), files


def assert_same(a, b):
    assert a[1:] == b[1:]
    for k in a[0]:
        for s in a[0][k]:
            for n in a[0][k][s]:
                assert torch.equal(a[0][k][s][n], b[0][k][s][n]), (k, s, n)


@pytest.mark.parametrize("bad,err,msg", [
    ([], ValueError, "no modules"), (None, TypeError, "modules must be"), ("lora", TypeError, "modules must be"),
    ([None], TypeError, "modules must be"),
])
def test_bad_registrations_change_nothing(eng, bad, err, msg):
    before, out = state(eng), forward(eng, ["a", "b"])
    for user, replace in (("new", False), ("a", True)):
        with pytest.raises(err, match=msg):
            eng.register(user, bad, replace=replace)
    assert_same(before, state(eng))
    assert_rel_close(forward(eng, ["a", "b"]), out)


@pytest.mark.parametrize("user,err", [("", ValueError), (None, TypeError), (3, TypeError), (b"a", TypeError)])
def test_bad_ids_are_refused(eng, user, err):
    with pytest.raises(err, match="user id"):
        eng.register(user, make(model().cfg, "ia3", 1))
    if user is not None:  # None in a batch is the base model
        with pytest.raises(err, match="user id"):
            eng.batch(["a", user])


@pytest.mark.parametrize("cap", [0, -1, 1.5, True, "2"])
def test_bad_capacity_is_refused(cap):
    with pytest.raises(ValueError, match="capacity must be a positive int"):
        Engine(model(), capacity=cap)


def test_unwritable_offload_folder_is_refused_at_once(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="not a writable folder"):
        Engine(model(), capacity=1, offload_dir=tmp_path / "file" / "sub")


def test_failed_eviction_save_leaves_victim_resident(tmp_path, monkeypatch):
    e = Engine(model(), backend="reference", capacity=1, offload_dir=tmp_path)
    e.register("a", make(model().cfg, "lora", 1))
    before, out = state(e), forward(e, ["a"])

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(e.store, "save", disk_full)
    with pytest.raises(OSError, match="No space"):
        e.register("b", make(model().cfg, "lora", 2))
    assert_same(before, state(e))
    assert_rel_close(forward(e, ["a"]), out)
    with pytest.raises(KeyError):
        e.batch(["b"])


def test_failed_bank_write_rolls_back_a_replace(eng, monkeypatch):
    from peftu_kernels.tenancy.methods import prompt as banks
    before, out = state(eng), forward(eng, ["a", "b"])

    def broken(self, slot, mod):
        raise MemoryError("out of device memory")
    monkeypatch.setattr(banks.PromptBank, "write", broken)
    with pytest.raises(MemoryError):
        eng.register("a", make(model().cfg, "lora+prompt", 4), replace=True)
    monkeypatch.undo()
    assert state(eng)[2] == before[2] and eng.modules("a")[0].config == make(model().cfg, "lora", 1)[0].config
    assert_rel_close(forward(eng, ["a", "b"]), out)


# --- the store: a user's modules are one set ---------------------------------------------------------------
def test_a_crash_between_two_files_keeps_the_old_set(tmp_path, monkeypatch):
    cfg = model().cfg
    save_user(tmp_path / "u", make(cfg, "lora+prompt", 1))
    before = {p.name: p.read_bytes() for p in (tmp_path / "u").iterdir()}
    import peftu_kernels.io as pio
    real, calls = pio.save_file, []

    def second_dies(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return real(tensors, path, metadata=metadata)
    monkeypatch.setattr(pio, "save_file", second_dies)
    with pytest.raises(KeyboardInterrupt):
        save_user(tmp_path / "u", make(cfg, "lora+prompt", 7))
    assert {p.name: p.read_bytes() for p in (tmp_path / "u").iterdir()} == before
    got = load_user(tmp_path / "u")
    assert [m.method for m in got] == ["lora", "prompt"] and torch.equal(
        got[1].tensors["prompt"], make(cfg, "prompt", 2)[0].tensors["prompt"])


def test_stale_and_orphan_files_are_never_loaded_and_get_cleaned(tmp_path):
    cfg = model().cfg
    d = tmp_path / "u"
    save_user(d, make(cfg, "houlsby", 1))
    save_user(tmp_path / "other", make(cfg, "ia3", 1))
    stale = next((tmp_path / "other").glob("ia3.*.safetensors"))
    (d / stale.name).write_bytes(stale.read_bytes())     # another method's file, left beside the set
    (d / "ia3.safetensors").write_bytes(stale.read_bytes())  # an old-format file
    (d / ".houlsby.1234abcd.safetensors.x.tmp").write_bytes(b"half")  # an orphaned temporary
    (d / "notes.txt").write_text("mine")                 # not ours: never deleted
    assert [m.method for m in load_user(d)] == ["houlsby"]
    save_user(d, make(cfg, "pfeiffer", 2))
    assert [m.method for m in load_user(d)] == ["pfeiffer"]
    names = sorted(p.name for p in d.iterdir())
    assert names[0] == "manifest.json" and names[1] == "notes.txt" and names[2].startswith("pfeiffer.")
    assert len(names) == 3


def test_an_earlier_process_offload_folder_is_not_read(tmp_path):
    cfg = model().cfg
    old = UserStore(tmp_path / "engine-000000000000")
    old.save("a", make(cfg, "prompt", 9))  # what a crashed process left behind
    e = Engine(model(), backend="reference", capacity=1, offload_dir=tmp_path)
    e.register("a", make(cfg, "lora", 1))
    e.register("b", make(cfg, "ia3", 2))
    assert_rel_close(forward(e, ["a"]), alone("lora", 1)[:1])
    e.close()
    assert not e.offload_dir.exists() and old.has("a")


# --- model inputs ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ids,mask,msg", [
    (torch.tensor([[5, 200]]), None, "outside this model's vocabulary"),
    (torch.tensor([[5, -1]]), None, "outside this model's vocabulary"),
    (torch.tensor([5, 6]), None, "2-D integer"),
    (torch.tensor([[5.0, 6.0]]), None, "2-D integer"),
    (torch.zeros(0, 4, dtype=torch.long), None, "empty"),
    (torch.zeros(2, 0, dtype=torch.long), None, "empty"),
    (torch.tensor([[5, 6]]), torch.ones(1, 3), "attention_mask must have"),
    (torch.tensor([[5, 6], [7, 8]]), torch.tensor([[1, 1], [0, 0]]), r"rows \[1\] have no tokens"),
])
def test_bad_model_inputs_are_refused(eng, ids, mask, msg):
    peft = eng.batch(["b"] * max(1, ids.shape[0])) if ids.dim() == 2 and ids.shape[0] else None
    with pytest.raises(ValueError, match=msg):
        greedy(model(), ids, mask, 2, peft=peft)


@pytest.mark.parametrize("n", [0, -1, 1.0, None])
def test_bad_max_new_tokens(n):
    with pytest.raises(ValueError, match="max_new_tokens"):
        greedy(model(), IDS, None, n)


@pytest.mark.parametrize("labels,msg", [([], "non-empty list"), ([[]], "candidate 0"), ([[3], [1000]], "candidate 1"),
                                        ([[3], [-2]], "vocabulary"), ("ab", "non-empty list")])
def test_bad_labels(labels, msg):
    from peftu_kernels.generate import score_labels
    with pytest.raises(ValueError, match=msg):
        score_labels(model(), IDS, None, labels)


def test_a_base_checkpoint_with_nan_is_refused(tmp_path):
    from peftu_kernels import load_pretrained, save_pretrained
    m = T5.from_config(small_cfg("gated-untied"))
    with torch.no_grad():
        m.encoder.block[0].layer[0].SelfAttention.q.weight[0, 0] = float("nan")
    save_pretrained(m, tmp_path / "ck")
    with pytest.raises(ValueError, match="NaN"):
        load_pretrained(tmp_path / "ck")


# --- random lifecycles against a model of what each row must get ---------------------------------------------
class Lifecycle(RuleBasedStateMachine):
    """register / replace / remove / evict / batch / forward over users of every method, on an engine with a
    small capacity and a disk tier. The model: user -> (kind, seed); each row must equal that module alone.
    Old handles after any mutation: StaleBatchError, or exactly what they gave when built."""
    users = Bundle("users")

    @initialize(cap=st.sampled_from([1, 2, 3, None]))
    def start(self, cap):
        import tempfile
        self.tmp = tempfile.TemporaryDirectory()
        self.eng = Engine(model(), backend="reference", capacity=cap, offload_dir=self.tmp.name if cap else None)
        self.truth, self.handles = {}, []

    def teardown(self):
        self.tmp.cleanup()

    @rule(target=users, user=st.sampled_from(WEIRD_IDS), kind=st.sampled_from(KINDS), seed=st.integers(0, 6))
    def register(self, user, kind, seed):
        if user in self.truth:
            with pytest.raises(ValueError, match="already registered"):
                self.eng.register(user, make(model().cfg, kind, seed))
        else:
            self.eng.register(user, make(model().cfg, kind, seed))
            self.truth[user] = (kind, seed)
        return user

    @rule(user=users, kind=st.sampled_from(KINDS), seed=st.integers(0, 6))
    def replace(self, user, kind, seed):
        self.eng.register(user, make(model().cfg, kind, seed), replace=True)
        self.truth[user] = (kind, seed)

    @rule(user=users)
    def remove(self, user):
        if user not in self.truth:
            with pytest.raises(KeyError):
                self.eng.remove(user)
            return
        self.eng.remove(user)
        del self.truth[user]

    @precondition(lambda self: self.truth)
    @rule(data=st.data())
    def serve(self, data):
        known = sorted(self.truth)
        distinct = self.eng.capacity or R
        pool = data.draw(st.lists(st.sampled_from(known), min_size=1, max_size=min(distinct, len(known)), unique=True))
        rows = data.draw(st.lists(st.sampled_from(pool + [None]), min_size=1, max_size=R))
        note(f"rows {rows}")
        h = self.eng.batch(rows)
        with torch.no_grad():
            got = model()(IDS[:len(rows)], DEC[:len(rows)], peft=h)
        want = [self.truth.get(u) for u in rows]
        for b, u in enumerate(rows):
            ref = alone(*want[b])[b] if u is not None else alone(None, 0)[b]
            assert_rel_close(got[b], ref, msg=lambda m: f"row {b} user {u!r} {want[b]}: {m}")
        self.handles.append((h, rows, got))

    @precondition(lambda self: self.handles)
    @rule(i=st.integers(0, 50))
    def old_handle(self, i):
        h, rows, then = self.handles[i % len(self.handles)]
        try:
            with torch.no_grad():
                got = model()(IDS[:len(rows)], DEC[:len(rows)], peft=h)
        except StaleBatchError:
            return
        assert_rel_close(got, then)  # served: exactly what its users had when it was built

    @invariant()
    def registry_matches(self):
        if hasattr(self, "eng"):
            assert set(self.eng.users) == set(self.truth)
            cap = self.eng.capacity
            assert cap is None or len(self.eng.slots) <= cap


Lifecycle.TestCase.settings = settings(CI, max_examples=60, stateful_step_count=15)
test_registry_lifecycle = Lifecycle.TestCase
