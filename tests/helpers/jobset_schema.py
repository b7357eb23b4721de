"""JobSet (jobset.x-k8s.io/v1alpha2) as its CRD defines the fields around the Job template, and a
structural-schema check. The embedded Job spec is a batch/v1 JobSpec, which the tests validate with
kubernetes-validate's bundled Kubernetes schemas. Rules written from JobSet's published CRD
(config/components/crd/bases/jobset.x-k8s.io_jobsets.yaml); a field the CRD lacks is an error, as
the API server's strict field validation would make it."""

from __future__ import annotations

STR, INT, BOOL = {"type": "string"}, {"type": "integer"}, {"type": "boolean"}
STRS = {"type": "array", "items": STR}
ANY = {"x-preserve": True}  # checked elsewhere (the JobSpec) or free-form


def obj(required=(), **props) -> dict:
    return {"type": "object", "properties": props, "required": list(required)}


def enum(*values) -> dict:
    return {"type": "string", "enum": list(values)}


RULE = obj(
    ("action", "name"),
    action=enum(
        "FailJobSet",
        "RestartJobSet",
        "RestartJobSetAndIgnoreMaxRestarts",
        "RestartJob",
        "RestartJobAndIgnoreMaxRestarts",
    ),  # fmt: skip
    name=STR,
    onJobFailureMessagePatterns=STRS,
    onJobFailureReasons=STRS,
    targetReplicatedJobs=STRS,
)
JOBSET_SPEC = obj(
    (),
    coordinator=obj(("replicatedJob",), jobIndex=INT, podIndex=INT, replicatedJob=STR),
    failurePolicy=obj(
        (),
        maxRestarts=INT,
        restartStrategy=enum("Recreate", "BlockingRecreate", "InPlaceRestart"),
        rules={"type": "array", "items": RULE},
    ),  # fmt: skip
    managedBy=STR,
    network=obj((), enableDNSHostnames=BOOL, publishNotReadyAddresses=BOOL, subdomain=STR),
    replicatedJobs={
        "type": "array",
        "items": obj(
            ("name", "template"),
            dependsOn=ANY,
            groupName=STR,
            name=STR,
            replicas=INT,
            template=obj((), metadata=ANY, spec=ANY),
        ),  # fmt: skip
    },
    startupPolicy=obj(("startupPolicyOrder",), startupPolicyOrder=enum("AnyOrder", "InOrder")),
    successPolicy=obj(("operator",), operator=enum("All", "Any"), targetReplicatedJobs=STRS),
    suspend=BOOL,
    ttlSecondsAfterFinished=INT,
    volumeClaimPolicies=ANY,
)
JOBSET = obj(("apiVersion", "kind", "metadata", "spec"), apiVersion=enum("jobset.x-k8s.io/v1alpha2"),
             kind=enum("JobSet"), metadata=ANY, spec=JOBSET_SPEC)  # fmt: skip

_TYPES = {"object": dict, "array": list, "string": str, "integer": int, "boolean": bool}


def errors(schema: dict, value, path: str = "") -> list[str]:
    """Every way `value` breaks `schema` (type, enum, required, unknown field), as 'path: what'."""
    if schema.get("x-preserve"):
        return []
    kind = schema["type"]
    if not isinstance(value, _TYPES[kind]) or (kind == "integer" and isinstance(value, bool)):
        return [f"{path or '.'}: expected {kind}, got {type(value).__name__}"]
    if "enum" in schema and value not in schema["enum"]:
        return [f"{path}: {value!r} not one of {schema['enum']}"]
    out = []
    if kind == "array":
        for i, item in enumerate(value):
            out += errors(schema["items"], item, f"{path}[{i}]")
    if kind == "object":
        props = schema.get("properties", {})
        out += [f"{path}.{k}: required" for k in schema.get("required", []) if k not in value]
        for k, v in value.items():
            out += errors(props[k], v, f"{path}.{k}") if k in props else [f"{path}.{k}: unknown field"]
    return out
