import pytest

from policies.config import PolicyError, parse_policy
from policies.tags import check_tags, format_admin_comment, parse_admin_comment, parse_tags

POLICY = parse_policy("""
[tags]
required = ["project", "cost_center"]
unknown = "reject"
[tags.allowed.cost_center]
regex = "CC[0-9]{2,6}"
description = "cost centre code like CC1234"
example = "CC1234"
[tags.allowed.ckpt]
values = ["yes", "no"]
[teams.vision]
accounts = ["vision"]
projects = ["vit-scaling", "detection"]
""")


@pytest.mark.parametrize(
    ("comment", "tags", "n_errors"),
    [
        (None, {}, 0),
        ("", {}, 0),
        ("project=a", {"project": "a"}, 0),
        (" Project = a , cost_center=CC1 ", {"project": "a", "cost_center": "CC1"}, 0),
        ("project=a,,cost_center=CC12,", {"project": "a", "cost_center": "CC12"}, 0),
        ("project=a,project=a", {"project": "a"}, 0),
        ("project=a,project=b", {"project": "a"}, 1),
        ("justtext", {}, 1),
        ("1bad=x", {}, 1),
        ("project=has space", {}, 1),
        ('project="quoted"', {}, 1),
        ("project=a;rm -rf /", {}, 1),
        ("project=x=y", {}, 1),
        ("project=\udcff\udcfe", {}, 1),
        ("k=v\nproject=a", {}, 1),
    ],
)
def test_parse_tags(comment, tags, n_errors):
    got, errors = parse_tags(comment)
    assert got == tags
    assert len(errors) == n_errors


def test_every_problem_is_listed_with_a_fixed_example():
    check = check_tags("project=nope,cost_center=XX,color=red", POLICY, "vision")
    assert not check.ok
    text = "\n".join(check.errors)
    assert "project 'nope' is not an allowed value of team vision" in text
    assert "allowed: vit-scaling, detection" in text
    assert "cost_center 'XX' does not look like cost centre code like CC1234" in text
    assert "unknown tag 'color'" in text
    assert len(check.errors) == 3
    assert check.example == 'sbatch --comment "project=vit-scaling,cost_center=CC1234" ...'


def test_missing_required_tags_keep_the_valid_ones_in_the_example():
    check = check_tags("project=detection", POLICY, "vision")
    assert check.errors == [
        "missing required tag 'cost_center' (cost centre code like CC1234)"
    ]
    assert check.example == 'sbatch --comment "project=detection,cost_center=CC1234" ...'


def test_valid_tags_are_normalised_required_first():
    check = check_tags("ckpt=yes, COST_CENTER=CC42 ,project=detection", POLICY, "vision")
    assert check.ok
    assert check.normalised() == "project=detection,cost_center=CC42,ckpt=yes"


def test_overlong_comment_is_one_clear_error():
    check = check_tags("project=" + "a" * 100_000, POLICY, "vision")
    assert len(check.errors) == 1
    assert "limit is 1024" in check.errors[0]
    assert check.example == 'sbatch --comment "project=vit-scaling,cost_center=CC1234" ...'


def test_unknown_keys_warn_when_policy_says_warn():
    policy = parse_policy('[tags]\nrequired = ["project"]\nunknown = "warn"\n')
    check = check_tags("project=x,color=red", policy, None)
    assert check.ok
    assert check.warnings == ["unknown tag 'color' kept as given"]
    assert check.tags == {"project": "x", "color": "red"}


def test_admin_comment_round_trip():
    text = format_admin_comment("vision", "rabc", {"project": "p", "cost_center": "CC1"})
    assert text == "slurmgate:v2;team=vision;rid=rabc;tags=project=p,cost_center=CC1"
    assert parse_admin_comment(text) == {
        "team": "vision", "rid": "rabc", "project": "p", "cost_center": "CC1"
    }
    assert parse_admin_comment("slurmgate:unchecked") == {}
    assert parse_admin_comment("something else") == {}
    assert parse_admin_comment(None) == {}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[tags]\nunknown = 'maybe'", "tags.unknown: must be one of 'warn', 'reject' or 'ignore'"),
        ("[tags]\nrequird = []", "tags.requird: unknown setting"),
        ("[tags.allowed.x]\nregex = '(['",
         "tags.allowed.x.regex: Value error, not a valid regular"),
        ("[teams.a]\nsoft_limit = 0.9\nhard_limit = 0.5",
         "soft_limit must not be above hard_limit"),
        ("[users]\nalice = 'ghost'", "users.alice names team 'ghost', which is not defined"),
        ("[teams.a]\naccounts=['x']\n[teams.b]\naccounts=['x']", "account 'x' belongs to both"),
        ("[teams.a]\nbudget = 'lots'", "teams.a.budget: Input should be a valid number"),
        ("this is = not toml [", "not valid TOML"),
    ],
)
def test_policy_errors_name_the_file_and_field(text, expected):
    with pytest.raises(PolicyError) as exc:
        parse_policy(text, "/etc/slurmgate/policy.toml")
    assert str(exc.value).startswith("/etc/slurmgate/policy.toml:")
    assert expected in str(exc.value)


def test_example_policy_is_valid():
    from pathlib import Path

    from policies.config import load_policy

    policy = load_policy(Path(__file__).resolve().parents[2] / "contrib/examples/policy.toml")
    assert policy.team_for("nlp", "alice") == "nlp"
    assert policy.team_for(None, "alice") == "vision"
    assert policy.team_for(None, "mallory") is None
    assert policy.teams_of_user("carol") == ["vision"]
    assert policy.teams_of_user("root") == ["nlp", "vision"]
