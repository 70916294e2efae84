"""A calibration corpus for the MiniLM pair: short SRE-domain text (the fine-tune's domain) and short everyday
sentences, disjoint from the held-out evaluation sentences.

Calibration should look like the text the model will serve. The built-in calibration half has 53 sentences
(about 500 tokens), fewer than the 1,536 inputs of an FFN matrix, and sequential calibration fits them far
better than it generalises (held-out 0.998 against 0.9996 on the calibration sentences themselves at 0.25 bit).
This corpus stands for the in-domain text a user of an SRE embedding model has. It holds, in order:

- the 53 built-in calibration sentences;
- written text (``benchmarks/data``): 2,447 SRE lines (terms, definitions, incident reports, alert titles,
  runbook steps, on-call questions over Kubernetes, hosts, networks, databases, queues, observability, SLOs,
  CI/CD, cloud, runtimes and security) and 1,642 everyday sentences on many topics, written without sight of
  the held-out sentences;
- sentences from templates (systems, symptoms, actions, alert names and states; people, doings and places).

No leakage into the evaluation: a line is dropped when it contains a held-out sentence, or shares any three
consecutive words (lower-cased) with one (:func:`leaks`); the held-out sentences' Kubernetes state words
(CrashLoopBackOff, ImagePullBackOff, OOMKilled, NotReady) appear nowhere. The written files are stored already
filtered; the template part is seeded and deterministic.

    python benchmarks/calib_corpus.py --sre 800 --general 300 -o calib.txt
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Callable, Iterable
from pathlib import Path

from deltacomp.quality.texts import CALIB_SENTENCES, HELDOUT_SENTENCES

SYSTEMS = (
    "the api pod", "the payment service", "the checkout worker", "the auth gateway", "the ingress controller",
    "the postgres primary", "the read replica", "the redis cluster", "the kafka broker", "the etcd member",
    "the nginx sidecar", "the search indexer", "the batch job", "the billing cron", "the metrics exporter",
    "the log shipper", "the frontend deployment", "the staging cluster", "the node pool", "the worker node",
    "the message queue", "the object store", "the cdn edge", "the vpn tunnel", "the jenkins agent",
    "the helm release", "the statefulset", "the daemonset", "the config map", "the service account",
    "the persistent volume", "the dns resolver", "the web tier", "the grpc backend", "the elasticsearch shard",
    "the rabbitmq consumer", "the prometheus server", "the grafana dashboard", "the alertmanager",
    "the terraform state", "the argo rollout", "the istio gateway", "the envoy proxy", "the haproxy frontend",
)
SYMPTOMS = (
    "is crashlooping", "was killed by the OOM killer", "keeps restarting", "is stuck in Pending",
    "cannot pull its image", "reports ErrImagePull", "got evicted", "is throttled on CPU", "is out of memory",
    "returns 502 errors", "returns 504 gateway timeouts", "times out on health checks", "fails its liveness probe",
    "fails its startup probe", "does not scale", "has high p99 latency", "drops connections",
    "leaks file descriptors", "ran out of inodes", "filled its disk", "lost quorum", "is lagging behind",
    "is flapping", "cannot resolve hostnames", "rejects the client certificate", "hit its connection limit",
    "has a memory leak", "exhausted the thread pool", "is stuck terminating", "went unschedulable",
    "shows a spike in errors", "is degraded", "failed to mount the volume", "cannot reach the registry",
    "is serving stale data",
)
WHEN = (
    "after the deploy", "since the last release", "during peak traffic", "every few minutes", "since midnight",
    "after the node upgrade", "in production", "in us-east-1", "on the canary", "after the config change",
    "since the key rotation", "after scaling down", "during the backup window", "after the kernel patch", "",
)
ACTIONS = (
    "restart", "roll back", "scale up", "drain", "cordon", "redeploy", "page the owner of", "check the logs of",
    "describe", "raise the memory limit of", "add replicas to", "silence the alert for", "open an incident for",
    "fail over", "rotate the credentials of", "clear the cache of", "raise the timeout of", "pin the image tag of",
    "investigate",
)
ALERTS = (
    "HighErrorRate", "KubeContainerWaiting", "NodeDiskPressure", "TargetDown", "HighLatency", "CPUThrottlingHigh",
    "KubeJobFailed", "etcdInsufficientMembers", "PrometheusRuleFailures", "CertificateExpiringSoon",
    "DiskWillFillIn4Hours", "KubeDeploymentReplicasMismatch",
)
STATES = (
    "ErrImagePull", "Evicted", "ContainerCreating", "Terminating", "FailedScheduling", "DeadlineExceeded", "BackOff",
    "Unhealthy", "FailedMount", "NodeHasDiskPressure", "Completed", "Error",
)

PEOPLE = (
    "my neighbour", "the teacher", "our grandfather", "a young doctor", "the old fisherman", "my sister",
    "the new student", "the baker", "a tourist", "the mayor", "the children", "my best friend", "the pilot",
    "a famous singer", "the librarian", "our team", "the farmer", "the nurse", "my uncle", "the artist",
)
DOINGS = (
    "painted the fence", "read a novel", "cooked dinner", "walked to the station", "planted roses",
    "visited the museum", "missed the bus", "baked a cake", "climbed the hill", "wrote a letter",
    "fixed the bicycle", "sang a song", "lost the keys", "won the race", "fed the ducks", "watched a film",
    "cleaned the kitchen", "bought fresh bread", "learned to dance", "called home",
)
PLACES = (
    "in the park", "by the lake", "at the market", "on a rainy afternoon", "before breakfast", "last weekend",
    "near the old church", "in the village", "after school", "on holiday", "at the beach", "in the evening", "",
)


def _sre(rng: random.Random) -> str:
    system, symptom, when = rng.choice(SYSTEMS), rng.choice(SYMPTOMS), rng.choice(WHEN)
    short = system.removeprefix("the ")
    k = rng.random()
    if k < 0.45:
        return f"{system} {symptom} {when}".strip()
    if k < 0.6:
        return f"{rng.choice(ACTIONS)} {system}"
    if k < 0.7:
        return f"alert {rng.choice(ALERTS)} firing for {short}"
    if k < 0.85:
        return f"{short} {rng.choice(STATES)} {when}".strip()
    return f"why {system} {symptom}"


def _general(rng: random.Random) -> str:
    return f"{rng.choice(PEOPLE)} {rng.choice(DOINGS)} {rng.choice(PLACES)}".strip()


def _trigrams(text: str) -> set[tuple[str, ...]]:
    w = text.lower().split()
    return {tuple(w[i:i + 3]) for i in range(len(w) - 2)}


_HELD_GRAMS = set().union(*(_trigrams(h) for h in HELDOUT_SENTENCES))
_HELD_LOWER = tuple(h.lower() for h in HELDOUT_SENTENCES)


def leaks(text: str) -> bool:
    """True when ``text`` contains a held-out sentence or shares three consecutive words with one."""
    low = text.lower()
    return any(h in low for h in _HELD_LOWER) or bool(_trigrams(text) & _HELD_GRAMS)


def _draw(make: Callable[[random.Random], str], count: int, rng: random.Random, seen: set[str]) -> list[str]:
    out: list[str] = []
    for _ in range(count * 200):
        if len(out) == count:
            return out
        text = make(rng)
        if text not in seen and not leaks(text):
            seen.add(text)
            out.append(text)
    raise ValueError(f"the templates give fewer than {count} distinct sentences")


DATA = Path(__file__).resolve().parent / "data"
WRITTEN = ("calib_sre.txt", "calib_everyday.txt")


def written() -> list[str]:
    """The written SRE lines, then the written everyday sentences (``benchmarks/data``)."""
    return [line for name in WRITTEN for line in (DATA / name).read_text().splitlines() if line.strip()]


def corpus(sre: int, general: int, seed: int = 0) -> list[str]:
    """The built-in calibration sentences, the written text, then ``sre`` SRE and ``general`` everyday sentences
    from the templates."""
    rng = random.Random(seed)
    seen = set(CALIB_SENTENCES) | set(HELDOUT_SENTENCES)
    drawn = [*_draw(_sre, sre, rng, seen), *_draw(_general, general, rng, seen)]
    return [*CALIB_SENTENCES, *written(), *drawn]


def write(path: Path, texts: Iterable[str]) -> Path:
    path.write_text("\n".join(texts) + "\n")
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sre", type=int, default=800)
    p.add_argument("--general", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-o", "--out", type=Path, required=True)
    a = p.parse_args()
    texts = corpus(a.sre, a.general, a.seed)
    write(a.out, texts)
    print(f"{len(texts)} sentences -> {a.out}")


if __name__ == "__main__":
    main()
