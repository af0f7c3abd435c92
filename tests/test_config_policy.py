import datetime

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from getcertd.auth import ChallengeStore, Identity
from getcertd.config import ProfileConfig, listen_port, parse_config, parse_duration
from getcertd.enroll import Credentials
from getcertd.errors import ConfigError, FailInfo, ScepFailure
from getcertd.policy import Policy

NOW = datetime.datetime(2026, 11, 27, 12, 0, tzinfo=datetime.timezone.utc)
CA_END = NOW + datetime.timedelta(days=365)
BASE = "[getcertd]\nstate_dir = /tmp/x\n[auth]\nusers = /tmp/users\n"


def test_sample_config_parses_with_every_key():
    cfg = parse_config(open("etc/getcertd.ini").read().replace("users =\n", "users = /tmp/u\n"), "etc/getcertd.ini")
    assert cfg.scep_paths == ("/cgi-bin/pkiclient.exe", "/scep")
    assert cfg.https_listen == "tcp:8443:interface=127.0.0.1"
    assert cfg.ca_key_type == "rsa2048" and cfg.ra and not cfg.allow_legacy_des
    assert cfg.profiles["default"].lifetime == 8 * 3600 and cfg.skew == 120
    assert cfg.profiles["default"].eku == ("ipsecIKE", "clientAuth")
    assert cfg.key_helpers == 0  # auto: one per CPU
    assert parse_config(BASE.replace("[auth]", "key_helpers = 3\n[auth]")).key_helpers == 3


@pytest.mark.parametrize("text,expected", [("90", 90), ("30s", 30), ("10m", 600), ("8h", 28800), ("2d", 172800)])
def test_durations(text, expected):
    assert parse_duration(text) == expected


@pytest.mark.parametrize("extra,needle", [
    ("[nosuch]\n", "unknown section"),
    ("[scep]\npath = /x\n", "unknown key 'path'"),
    ("[ca]\nkey_type = dsa\n", "key_type"),
    ("[scep]\nallow_legacy_des = maybe\n", "yes or no"),
    ("[policy]\nlifetime = soon\n", "duration"),
    ("[radius]\nsecret = x\n", "[radius] servers"),
    ("[radius]\nservers = 127.0.0.1:1812\nsecret = x\nnas_identifier =\n", "[radius] nas_identifier"),
    ("[policy]\nprofile_map = gold=nosuch\n", "profile_map"),
    ("[policy]\neku = ipsecIKE clientauth\n", "[policy] eku: 'clientauth'"),
    ("[profile x]\neku = 1.3.6.1.5.5.7.3.\n", "[profile x] eku"),
    ("[policy]\nskew = 2d\n", "[policy] skew: at most 1d"),
    ("[policy]\nlifetime = 30s\n", "[policy] lifetime: at least 1m"),  # it said [profile default]
    ("[https]\nidle_timeout = 0\n", "[https] idle_timeout: at least 1s"),  # was clamped to 1 s without a word
    ("[https]\nrequest_timeout = 0s\n", "[https] request_timeout: at least 1s"),
    ("[crl]\ninterval = 0\n", "[crl] interval: at least 1s"),
    ("[radius]\nservers = 127.0.0.1:1812\nsecret = x\ntimeout = 0\n", "[radius] timeout: at least 1s"),
    # these were tracebacks from twistd (found by an operator review)
    ("[https]\nlisten = tcp:notaport\n", "[https] listen: 'tcp:notaport': the port must be a number"),
    ("[https]\nlisten = tcp:99999\n", "[https] listen: 'tcp:99999': the port must be a number from 0 to 65535"),
    ("[https]\nlisten = bogus:1234\n", "[https] listen: 'bogus:1234': unknown kind 'bogus'"),
    ("[https]\nlisten =\n", "[https] listen: required"),
    ("[http]\nlisten = tcp:port=x\n", "[http] listen: 'tcp:port=x': the port must be"),
    ("[metrics]\nlisten = tcp:xx:interface=127.0.0.1\n", "[metrics] listen: 'tcp:xx:interface=127.0.0.1'"),
    ("[getcertd]\nserver_name =\n", "[getcertd] server_name: '' is not a DNS name"),
    ("[getcertd]\nserver_name = vpn ca.example\n", "[getcertd] server_name: 'vpn ca.example'"),
    ("[getcertd]\nserver_name = " + "a" * 65 + "\n", "at most 64 characters"),
    ("[ca]\nsubject = getcertd CA\n", "[ca] subject: 'getcertd CA' is not a distinguished name"),
    ("[ca]\nsubject = CN=\n", "[ca] subject: 'CN='"),
    ("[ca]\nsubject = CN=x, O=\n", "[ca] subject: 'CN=x, O=' has an attribute with no value"),
    ("[ca]\nsubject =\n", "[ca] subject: must not be empty"),
    ("[crl]\nurl = crl.example/ca.crl\n", "[crl] url: 'crl.example/ca.crl' is not an http:// or https:// URL"),
    ("[crl]\nurl = http://crl.example:99999/ca.crl\n", "[crl] url: 'http://crl.example:99999/ca.crl'"),
])
def test_config_errors_name_the_key(extra, needle):
    base = BASE.replace("users = /tmp/users", "backend = radius") if extra.startswith("[radius]") else BASE
    if extra.startswith("[getcertd]\n"):
        base, extra = BASE.replace("[getcertd]\n", extra), ""
    with pytest.raises(ConfigError) as e:
        parse_config(base + extra, "test.ini")
    assert needle in str(e.value) and str(e.value).startswith("test.ini")


def test_listen_values_server_names_and_urls_that_work():
    cfg = parse_config(BASE.replace("[getcertd]\n", "[getcertd]\nserver_name = vpn-ca.example.com.\n")
                       + "[https]\nlisten = tcp:port=443:interface=\\:\\:1\n[http]\nlisten = unix:/run/g.sock\n"
                       "[crl]\nurl = http://vpn-ca.example.com/ca.crl\n"
                       "[ca]\nsubject = CN=Example VPN CA, O=Example\\, Inc.\n")
    assert listen_port(cfg.https_listen) == 443 and listen_port(cfg.http_listen) is None
    assert listen_port("tcp:8443:interface=127.0.0.1") == 8443 and listen_port("8443") == 8443
    assert parse_config(BASE.replace("[getcertd]\n", "[getcertd]\nserver_name = ::1\n")).server_name == "::1"


def test_bad_templates_are_config_errors_naming_the_section():
    base = parse_config(BASE)
    for subject, san, needle in (("CN={nonsense}", "", "[profile x] subject: unknown placeholder {nonsense}"),
                                 ("CN={user", "", "[profile x] subject: a { or } outside a placeholder"),
                                 ("CN={user}, XX=1", "", "[profile x] subject: subject template: expected ATTR=value"),
                                 ("CN={user}", "ip:{user}", "[profile x] san: san template: expected email:")):
        profiles = dict(base.profiles, x=ProfileConfig("x", 3600, subject, san, ()))
        with pytest.raises(ConfigError) as e:
            Policy(profiles)
        assert needle in str(e.value)


@pytest.mark.parametrize("value,needle", [("0", "must be at least 1"), ("many", "expected a whole number")])
def test_key_helpers_is_auto_or_a_count(value, needle):
    with pytest.raises(ConfigError, match=r"\[getcertd\] key_helpers: " + needle):
        parse_config(BASE.replace("[auth]", f"key_helpers = {value}\n[auth]"), "test.ini")


def test_radius_and_profiles():
    cfg = parse_config(BASE.replace("users = /tmp/users", "backend = radius") + "[radius]\nservers = 127.0.0.1:1812 [::1]:1813\n"
                       "secret = s3cret\n[policy]\nprofile_map = ikev2-short=short\n[profile short]\nlifetime = 10m\n")
    assert cfg.radius.servers == (("127.0.0.1", 1812), ("::1", 1813)) and cfg.radius.secret == b"s3cret"
    assert "s3cret" not in repr(cfg) and "s3cret" not in repr(cfg.radius)
    assert cfg.profiles["short"].lifetime == 600 and cfg.profile_map == {"ikev2-short": "short"}


def test_a_password_is_not_in_the_credentials_repr():
    assert "hunter2" not in repr(Credentials("alice", b"hunter2")) and "alice" in repr(Credentials("alice", b"x"))


def policy(**kw):
    cfg = parse_config(BASE + "[policy]\nsan = email:{user}@example.com\nprofile_map = gold=short\n"
                       "[profile short]\nlifetime = 10m\nsubject = CN={user}, OU=short, O=Example\n")
    args = dict(profiles=cfg.profiles, profile_map=cfg.profile_map, skew=cfg.skew)
    args.update(kw)
    return Policy(**args)


def rsa_key(bits=2048):
    return rsa.generate_private_key(public_exponent=65537, key_size=bits).public_key()


RSA = rsa_key()


def test_subject_from_identity_template_and_lifetime():
    d = policy().decide(Identity("alice", "local"), RSA, NOW, CA_END)
    assert d.subject.rfc4514_string() == "CN=alice,OU=remote-access,O=getcertd"
    assert d.san == (x509.RFC822Name("alice@example.com"),)
    assert d.not_after - NOW == datetime.timedelta(hours=8)
    assert NOW - d.not_before == datetime.timedelta(minutes=2)
    assert d.key_type == "rsa2048" and d.profile == "default"


def test_profile_by_hint_and_session_timeout_cap():
    d = policy().decide(Identity("bob", "radius-pap", session_timeout=300, profile_hints=("gold",)), RSA, NOW, CA_END)
    assert d.profile == "short" and d.not_after - NOW == datetime.timedelta(seconds=300)
    assert d.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)[0].value == "short"


def test_names_made_once_per_user_and_profile_are_the_right_ones():
    """The subject and subjectAltNames are made once per (templates, user, profile): a second decision gets the
    same objects, another user or profile (one whose template is the same but {profile} differs) its own, and
    the issuance log's subject text is that subject's RFC 4514 string."""
    p = Policy(profiles={"default": ProfileConfig("default", 3600, "CN={user}, OU={profile}", "dns:{local}.x", ()),
                         "b": ProfileConfig("b", 3600, "CN={user}, OU={profile}", "dns:{local}.x", ())},
               profile_map={"to-b": "b"})
    first, again = (p.decide(Identity("carol@x", "local"), RSA, NOW, CA_END) for _ in range(2))
    assert again.subject is first.subject and again.san is first.san
    assert first.subject_text == first.subject.rfc4514_string() == "CN=carol@x,OU=default"
    other = p.decide(Identity("carol@x", "local", profile_hints=("to-b",)), RSA, NOW, CA_END)
    assert other.subject_text == "CN=carol@x,OU=b" and other.san == (x509.DNSName("carol.x"),)
    assert p.decide(Identity("dave", "local"), RSA, NOW, CA_END).subject_text == "CN=dave,OU=default"
    with pytest.raises(ScepFailure):  # a refusal is not kept: refused again, not answered from a cache
        p.decide(Identity("d" * 65, "local"), RSA, NOW, CA_END)
    with pytest.raises(ScepFailure):
        p.decide(Identity("d" * 65, "local"), RSA, NOW, CA_END)


def test_lifetime_never_beyond_ca():
    d = policy().decide(Identity("alice", "local"), RSA, NOW, NOW + datetime.timedelta(minutes=5))
    assert d.not_after == NOW + datetime.timedelta(minutes=5)


@pytest.mark.parametrize("user", ["a,OU=admins", "x+CN=root", 'q"uote', "eq=ual", "back\\slash"])
def test_hostile_names_stay_in_one_attribute(user):
    p = Policy(profiles={"default": ProfileConfig("default", 3600, "CN={user}, O=Example", "", ())})
    d = p.decide(Identity(user, "local"), RSA, NOW, CA_END)
    assert len(d.subject.rdns) == 2
    assert d.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == user


@pytest.mark.parametrize("user", ["new\nline", "nul\x00", "x" * 65, ""])
def test_control_characters_and_long_names_refused(user):
    with pytest.raises(ScepFailure) as e:
        policy().decide(Identity(user, "local"), RSA, NOW, CA_END)
    assert e.value.fail_info == FailInfo.badRequest


def test_san_injection_refused():
    with pytest.raises(ScepFailure):
        policy().decide(Identity("a b@evil.com", "local"), RSA, NOW, CA_END)


@pytest.mark.parametrize("key,ok", [
    (RSA, True), (rsa_key(1024), False), (ec.generate_private_key(ec.SECP256R1()).public_key(), True),
    (ec.generate_private_key(ec.SECP384R1()).public_key(), True),
    (ec.generate_private_key(ec.SECP521R1()).public_key(), False),
    (ed25519.Ed25519PrivateKey.generate().public_key(), True)])
def test_accepted_keys(key, ok):
    if ok:
        policy().decide(Identity("alice", "local"), key, NOW, CA_END)
    else:
        with pytest.raises(ScepFailure) as e:
            policy().decide(Identity("alice", "local"), key, NOW, CA_END)
        assert e.value.fail_info == FailInfo.badAlg and e.value.text


def test_per_user_limits():
    p = policy(max_valid_per_user=2, max_per_user_per_hour=3)
    p.decide(Identity("alice", "local"), RSA, NOW, CA_END, valid_count=1, issued_last_hour=2)
    with pytest.raises(ScepFailure, match="still valid"):
        p.decide(Identity("alice", "local"), RSA, NOW, CA_END, valid_count=2)
    with pytest.raises(ScepFailure, match="rate limit"):
        p.decide(Identity("alice", "local"), RSA, NOW, CA_END, issued_last_hour=3)
    policy(max_valid_per_user=0, max_per_user_per_hour=0).decide(
        Identity("alice", "local"), RSA, NOW, CA_END, valid_count=99, issued_last_hour=99)


def test_challenge_store_binds_user_and_expires():
    s = ChallengeStore(ttl=60)
    s.put("t1", "alice", b"state", now=0)
    assert s.take("t1", "mallory", now=1) is None  # bound to the user (and not spent by another)
    assert s.take("t1", "alice", now=1) == (b"state", 1)
    s.put("t2", "alice", b"state", now=0)
    assert s.take("t2", "alice", now=61) is None
    s.put("t3", "alice", b"state", now=0, rounds=2)
    assert s.take("t3", "alice", now=30) == (b"state", 2) and s.take("t3", "alice", now=30) is None
    assert len(s) == 0


def test_challenge_store_caps_each_user_and_address_and_never_drops_another_users():
    s = ChallengeStore(ttl=60, max_entries=5, per_user=3, per_client=10)
    assert s.put("carol", "carol", b"c", now=0, client="10.0.0.3")
    for i in range(5):  # bob's own oldest make way for his newest
        assert s.put(f"bob{i}", "bob", b"b", now=1, client="10.0.0.2")
    assert len(s) == 4 and s.take("bob0", "bob", now=2) is None and s.take("bob4", "bob", now=2) == (b"b", 1)
    assert s.put("x0", "user0", b"x", now=2, client="10.0.0.9") and s.put("x1", "user1", b"x", now=2, client="10.0.0.9")
    assert not s.put("y", "other", b"y", now=2, client="10.0.0.9")  # the store is full: refused, nothing dropped
    assert s.take("carol", "carol", now=3) == (b"c", 1)
    assert s.put("late", "late", b"l", now=63, client="10.0.0.8") and len(s) == 1  # the rest expired
    s = ChallengeStore(ttl=60, per_client=2)
    assert s.put("a", "a", b"a", now=0, client="10.0.0.9") and s.put("b", "b", b"b", now=0, client="10.0.0.9")
    assert not s.put("c", "c", b"c", now=0, client="10.0.0.9")  # the address has its share
    assert s.put("c", "c", b"c", now=0, client="10.0.0.8")


def test_throttle_backs_off_exponentially_then_locks_out():
    from getcertd.auth import Throttle
    t = Throttle(free=3, max_wait=100, lockout_after=8, lockout=900, forget=3600)
    k = "alice"
    for i in range(3):
        assert t.wait(k, 0) == 0
        t.failure(k, 0)
    assert t.wait(k, 0) == 1  # 2**0 after the free failures
    t.failure(k, 10)
    assert t.wait(k, 10) == 2 and t.wait(k, 12) == 0
    for now in range(20, 24):
        t.failure(k, now)
    assert t.wait(k, 23) == 900  # 8 failures: locked out
    assert t.wait("bob", 23) == 0  # other keys are untouched
    assert t.wait(k, 23 + 3601) == 0  # forgotten after an hour without failures
    t.failure(k, 0)
    t.success(k)
    assert t.wait(k, 0) == 0


def test_throttle_counts_attempts_in_flight():
    """Guesses sent in parallel: only as many distinct ones as free failures are left may be undecided at once;
    the same password sent many times at once is one attempt."""
    from getcertd.auth import Throttle
    t = Throttle(free=3, max_wait=100, lockout_after=8, lockout=900, forget=3600)
    for guess in ("g1", "g2", "g3"):
        assert not t.busy("alice", guess) and t.wait("alice", 0) == 0
        t.begin("alice", guess)
    assert t.busy("alice", "g4") and not t.busy("alice", "g1") and not t.busy("bob", "g4")
    t.begin("alice", "g1")  # a second g1 shares the first one's place
    t.end("alice", "g1")
    assert t.busy("alice", "g4")
    t.end("alice", "g1")
    t.failure("alice", 0)
    assert t.busy("alice", "g4")  # 1 failure + 2 undecided
    for guess in ("g2", "g3"):
        t.end("alice", guess)
        t.failure("alice", 0)
    assert not t.busy("alice", "g4")
    assert t.wait("alice", 0) == 1 and t.wait("alice", 1) == 0  # the exponential delay after 3 failures
    assert t.waiting(0) == {"alice": 1} and t.clear("alice") and t.wait("alice", 0) == 0 and not t.clear("alice")


def test_eku_names_agree_with_the_ca():
    from getcertd.ca import EKU_BY_NAME
    from getcertd.config import EKU_NAMES
    assert set(EKU_NAMES) == set(EKU_BY_NAME)
    assert parse_config(BASE + "[policy]\neku = ipsecIKE 1.3.6.1.5.5.8.2.2\n").profiles["default"].eku == (
        "ipsecIKE", "1.3.6.1.5.5.8.2.2")


@pytest.mark.parametrize("subject,san,user,refused", [
    ("CN={user}, EMAIL={user}", "", "j\u00fcrgen@example.com", "emailAddress takes ASCII only"),
    ("CN={user}, DC={user}", "", "j\u00fcrgen", "DC takes ASCII only"),
    ("CN=x, SERIALNUMBER={user}", "", "john_doe", "serialNumber takes letters"),
    ("CN={user}", "uri:https://vpn.example.com/users/{user}", "j\u00fcrgen", "valid URI subjectAltName"),
])
def test_a_name_its_attribute_type_cant_hold_is_refused_not_mangled(subject, san, user, refused):
    """An IA5String holds ASCII only and a PrintableString a small set: such a value was written as UTF-8 bytes
    into an IA5String, failed at signing (503 'try again'), or raised out of the policy (500)."""
    cfg = parse_config(BASE + f"[policy]\nsubject = {subject}\nsan = {san}\n")
    with pytest.raises(ScepFailure, match=refused) as e:
        Policy(profiles=cfg.profiles, skew=cfg.skew).decide(Identity(user, "local"), RSA, NOW, CA_END)
    assert e.value.fail_info == FailInfo.badRequest
    ok = Policy(profiles=cfg.profiles, skew=cfg.skew).decide(Identity("JD-42", "local"), RSA, NOW, CA_END)
    assert ok.subject and ok.key_type == "rsa2048"


def test_a_renewal_of_a_profile_no_longer_configured_is_refused_not_a_500():
    with pytest.raises(ScepFailure) as caught:
        policy().decide(Identity("alice", "renewal"), RSA, NOW, CA_END, profile="gone")
    assert caught.value.fail_info == FailInfo.badRequest and "'gone' is no longer configured" in caught.value.text


def test_validity_nests_in_the_cas():
    ca_start = NOW - datetime.timedelta(seconds=30)
    d = policy().decide(Identity("alice", "local"), RSA, NOW, CA_END, ca_not_before=ca_start)
    assert d.not_before == ca_start  # not the 2 minutes of skew before it
    with pytest.raises(ScepFailure) as caught:
        policy().decide(Identity("alice", "local"), RSA, NOW, CA_END,
                        ca_not_before=NOW + datetime.timedelta(minutes=10))
    assert caught.value.fail_info == FailInfo.badTime and "not valid before" in caught.value.text


@pytest.mark.parametrize("template, name, bound", [("OU=vpn-users-{user}", "OU", 64), ("O={user} Corp", "O", 64),
                                                   ("SERIALNUMBER=ID-{user}", "serialNumber", 64),
                                                   ("L={user}{user}{user}", "L", 128)])
def test_every_bounded_subject_attribute_is_held_to_its_upper_bound(template, name, bound):
    p = Policy(profiles={"default": ProfileConfig("default", 3600, "CN=x, " + template, "", ())})
    user = "u" * 63
    with pytest.raises(ScepFailure) as caught:
        p.decide(Identity(user, "local"), RSA, NOW, CA_END)
    assert caught.value.fail_info == FailInfo.badRequest
    assert f"{name} takes at most {bound} characters" in caught.value.text
    p.decide(Identity("u" * 10, "local"), RSA, NOW, CA_END)  # fits


def test_a_challenge_prompt_is_one_printable_line():
    from getcertd.enroll import _prompt
    assert _prompt("Enter code\r\nX-Injected: yes\r\n\x1b[2J\x07\x00tail\n") == "Enter code X-Injected: yes [2J tail"
    assert _prompt("") == _prompt("\r\n") == "Enter the response"
    assert len(_prompt("x" * 4000)) == 200 and _prompt("Código: ") == "Código:"


def test_the_throttle_counts_spellings_of_one_name_together():
    from getcertd.auth import throttle_key
    assert throttle_key("ALICE") == throttle_key("Alice") == throttle_key("alice") == "alice"
    assert throttle_key("ＡＬＩＣＥ") == "alice" and throttle_key("Straße") == throttle_key("STRASSE")
    assert throttle_key("bob") != throttle_key("alice")


def test_the_first_hint_that_profile_map_names_chooses_the_profile():
    p = policy()
    assert p.profile_for(Identity("u", "radius-pap", profile_hints=("nps-0001", "gold"))).name == "short"
    assert p.profile_for(Identity("u", "radius-pap", profile_hints=("nps-0001",))).name == "default"
    with pytest.raises(ScepFailure):  # a mapped user can't name another profile (an EST label)
        p.choose_profile(Identity("u", "radius-pap", profile_hints=("nps-0001", "gold")), "default")


def test_a_clock_stepped_back_does_not_lengthen_a_wait():
    from getcertd.auth import Throttle
    t = Throttle(free=3, max_wait=100, lockout_after=8, lockout=900, forget=3600)
    for _ in range(4):
        t.failure("carol", 1000)
    assert t.wait("carol", 1000) == 2
    assert t.wait("carol", 400) == 2  # not 602 s: the step back is not a wait
