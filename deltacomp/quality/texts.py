"""Evaluation text: built-in sets (used when no data file is given) and the texts of a data file's records."""

from __future__ import annotations

import os

from deltacomp.errors import DeltacompError
from deltacomp.io.text_records import PromptAnswer, Record, Text, read_records

# Short prose and code for causal LMs: the default of `deltacomp eval` on a decoder.
DEFAULT_TEXTS = (
    "The history of the printing press begins in the fifteenth century, when movable metal type made it possible "
    "to produce books far faster than scribes could copy them. Within fifty years, presses were working in more "
    "than two hundred European cities.",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n    a, b = 0, 1\n    for _ in range(n):\n"
    "        a, b = b, a + b\n    return a\n",
    "Photosynthesis converts light energy into chemical energy. Plants take in carbon dioxide and water and, using "
    "sunlight, produce glucose and release oxygen as a by-product.",
    "To reset your password, open the settings page, choose 'Security', and click 'Change password'. You will "
    "receive an email with a confirmation link that expires after one hour.",
    "import json\n\ndef load_config(path):\n    with open(path) as f:\n        config = json.load(f)\n"
    "    if 'name' not in config:\n        raise ValueError('config has no name')\n    return config\n",
    "The river rose steadily through the night, and by morning the low fields along its banks were under water. "
    "Farmers moved their animals to higher ground while volunteers filled sandbags near the bridge.",
    "Q: What is the capital of France?\nA: The capital of France is Paris.\nQ: How many legs does a spider have?\n"
    "A: A spider has eight legs.",
    "A balanced diet includes vegetables, fruit, whole grains and a source of protein. Drinking enough water and "
    "sleeping well matter as much as what is on the plate.",
    "for i in range(10):\n    if i % 2 == 0:\n        print(i, 'is even')\n    else:\n        print(i, 'is odd')\n",
    "The committee met on Tuesday to review the budget for next year. After a long discussion, members agreed to "
    "increase spending on public transport and to delay the new library by one year.",
    "Machine learning models learn patterns from data. A model that fits its training data too closely may fail "
    "to generalise, a problem known as overfitting; regularisation and more data both help.",
    "SELECT name, COUNT(*) AS orders\nFROM customers JOIN orders ON customers.id = orders.customer_id\n"
    "GROUP BY name\nORDER BY orders DESC\nLIMIT 10;",
    "She opened the old wooden box and found a stack of letters tied with a blue ribbon, each one addressed to her "
    "grandmother in the same careful handwriting.",
    "The speed of light in a vacuum is about 299,792 kilometres per second. Nothing that carries information can "
    "travel faster, a limit at the heart of Einstein's theory of special relativity.",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n"
    "        self.items.append(item)\n\n    def pop(self):\n        return self.items.pop()\n",
    "Good documentation explains not only what a function does but why it exists, which inputs it accepts, and "
    "what happens when something goes wrong.",
)

# Site-reliability sentences (the domain of the real MiniLM fine-tune) and general ones: the sentence set of the
# MiniLM quality benchmark. The order mixes the two, so that halves (calibration / held-out) hold both.
SRE_SENTENCES = (
    "pod keeps crashing", "CrashLoopBackOff", "the node is out of disk space",
    "kubectl get pods shows ImagePullBackOff", "latency on the checkout service spiked after the deploy",
    "rollback the last release", "the database connection pool is exhausted", "OOMKilled container restarted",
    "certificate expired on the ingress", "alert: p99 latency above SLO for 10 minutes",
    "disk I/O saturation on the primary replica", "the cron job did not run last night",
    "DNS resolution fails intermittently inside the cluster", "increase the replica count of the deployment",
    "memory leak in the payment worker", "the load balancer health check is failing",
    "terraform plan shows unexpected drift", "paging the on-call engineer", "error budget burned through in two days",
    "the readiness probe times out", "liveness probe failed and the container was killed",
    "the service returns 503 under load", "too many open files in the API gateway",
    "the Kafka consumer lag keeps growing", "replication lag on the read replica is ten minutes",
    "the TLS handshake fails for some clients", "the pod is stuck in Pending state",
    "node NotReady after a kernel upgrade", "evicted pods because of memory pressure",
    "the horizontal pod autoscaler is not scaling up", "CPU throttling on the search service",
    "the deployment is stuck on rolling update", "persistent volume claim is not bound",
    "the Redis cache hit ratio dropped", "the queue is backing up during peak traffic",
    "the canary release shows more 5xx errors", "post-mortem for last night's outage",
    "the SSL certificate renewal job failed", "etcd cluster lost quorum", "the build pipeline is red since noon",
    "runbook for restarting the ingress controller", "the disk filled up with old log files",
    "garbage collection pauses cause timeouts", "the service mesh sidecar crashes on start",
    "the API rate limit was exceeded", "database migration locked the users table",
    "connection refused when calling the auth service", "the container image is too large to pull quickly",
    "configure alerting for error rate above one percent", "the backup job has not completed in a week",
    "traffic failover to the secondary region", "the secrets were rotated and the app cannot connect",
    "high tail latency on the recommendation API", "the health endpoint returns 500",
    "the cluster autoscaler cannot add nodes", "zombie processes pile up in the worker container",
    "the incident was resolved by scaling the database", "the metrics scrape is failing for half the targets",
    "slow queries after the index was dropped", "the deploy froze because of a failing migration",
)
GENERAL_SENTENCES = (
    "how do I bake sourdough bread", "the cat sat on the mat", "a quiet walk along the river at dawn",
    "quarterly revenue grew by eight percent", "the train was late again this morning",
    "my grandmother grows tomatoes in her garden", "the museum opens at ten on Sundays",
    "she plays the violin in the city orchestra", "the recipe needs two eggs and a cup of flour",
    "a thunderstorm is expected this afternoon", "the children built a sandcastle on the beach",
    "he finished the marathon in under four hours", "the library has a new collection of poetry",
    "we watched the sunset from the top of the hill", "the price of coffee went up again",
    "the football match ended in a draw", "learning a new language takes patience",
    "the bakery on the corner sells fresh croissants", "the mountains were covered in snow",
    "our flight was delayed by two hours", "the novel tells the story of a sailor lost at sea",
    "the dog barked at the mail carrier", "a cup of tea before bed helps me sleep",
    "the students prepared for their final exams", "the festival attracts visitors from all over the world",
    "photosynthesis turns sunlight into chemical energy", "the stock market fell sharply on Monday",
    "the painting was sold at auction for a record price", "he fixed the bicycle's flat tire",
    "the town council approved the new park", "whales migrate thousands of kilometres each year",
    "the soup needs a little more salt", "she wrote a letter to her old friend",
    "the bridge was closed for repairs", "a good night's sleep improves memory",
    "the farmer harvested the wheat in August", "the orchestra played a symphony by Beethoven",
    "the kids are learning to swim this summer", "the hotel room had a view of the sea",
    "electric cars are becoming more popular", "the astronaut described the view of Earth from orbit",
    "the garden is full of butterflies in spring", "the teacher explained the rules of chess",
    "the company hired fifty new employees", "the volcano erupted for the first time in a century",
)


def _interleave(a, b) -> tuple[str, ...]:
    out = []
    for i in range(max(len(a), len(b))):
        out += [x[i] for x in (a, b) if i < len(x)]
    return tuple(out)


EVAL_SENTENCES = _interleave(SRE_SENTENCES, GENERAL_SENTENCES)
# Disjoint halves of that set, each with both domains: calibrate on one, report agreement on the other.
CALIB_SENTENCES = SRE_SENTENCES[::2] + GENERAL_SENTENCES[::2]
HELDOUT_SENTENCES = SRE_SENTENCES[1::2] + GENERAL_SENTENCES[1::2]

def record_text(record: Record) -> str:
    """The text of an evaluation record: a text as it is, a prompt and its answer, or a conversation's messages,
    each on its own line."""
    if isinstance(record, Text):
        return record.text
    if isinstance(record, PromptAnswer):
        return f"{record.prompt}\n{record.answer}"
    return "\n".join(m["content"] for m in record.messages)


def read_texts(path: str | os.PathLike, max_samples: int | None = None) -> list[str]:
    """The texts of an evaluation data file (:func:`deltacomp.io.text_records.read_records`): a plain text file by
    paragraph (a paragraph is one scored text; by line when it has no blank lines), JSON lines by record."""
    texts = [record_text(r).strip() for r in read_records(path, split="paragraphs")]
    texts = [t for t in texts if t]
    if not texts:
        raise DeltacompError(f"data file {path} holds no text")
    return texts[:max_samples] if max_samples else texts
