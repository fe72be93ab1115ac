"""SmokeTest: the last step of the deploy, a Job in the cluster that checks the mesh carries traffic.

The Jobs (manifests/smoke/) are applied after every manifest they check: each declared service's
version Services, policies and CiliumEnvoyConfig, and with the sample app its workloads, policies and
Ingress (all of them one step after Cilium, so the chain of steps does not grow). The main Job writes
one line into a ConfigMap: "pass" or what failed, naming the service; its script retries until the
NLB and the services answer.
A KubernetesObjectValue waits for that line (the step the smoke test adds after the manifests), and
one quick apply hands it back to the cluster as the ConfigMap smoke-test-result, which an admission
policy (in manifests/smoke/smoke-test.yaml) refuses unless it is "pass", with the line as its message:
the kubectl provider fails the stack with that message. Each change of
the Job (script, weights, settings) gets a new name, so an update reruns it; an unchanged deploy
does not.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from aws_cdk import Duration
from aws_cdk import aws_eks_v2 as eks
from constructs import Construct, IConstruct

from .smoke_files import VERDICT_WAIT_S, result_document, smoke_documents, verdict_configmap
from .traffic import MeshService


@dataclass(frozen=True)
class SmokeTestProps:
    """What SmokeTest needs.

    cluster:        the cluster, with its kubectl provider.
    services:       the declared services, whose splits, pins and routes the Job checks.
    datapath:       the datapath (the services' policies carry its L7 rules).
    network_policy: whether policies are applied (without them the deny checks are left out).
    sample_app:     whether the sample app's Ingress and app are checked too.
    encryption:     "wireguard": also every node's WireGuard key; default "none".
    after:          every manifest the Job checks, and what they wait for (Cilium ready, the namespaces).
    """

    cluster: eks.ICluster
    services: tuple[MeshService, ...]
    datapath: str
    network_policy: bool
    sample_app: bool
    after: tuple[IConstruct, ...]
    encryption: str = "none"


class SmokeTest(Construct):
    """The Job, the wait for its verdict, and the verdict as the deploy's outcome."""

    def __init__(self, scope: Construct, id: str, props: SmokeTestProps) -> None:
        super().__init__(scope, id)
        cluster = props.cluster
        documents = smoke_documents(props.services, props.datapath, props.network_policy, props.sample_app, props.encryption)
        self.documents = copy.deepcopy(documents)
        self.job = eks.KubernetesManifest(self, "Job", cluster=cluster, manifest=documents)
        self.job.node.add_dependency(*props.after)
        namespace, configmap, key = verdict_configmap(documents)
        self.verdict_namespace, self.verdict_configmap, self.verdict_key = namespace, configmap, key
        self.verdict = eks.KubernetesObjectValue(
            self,
            "Verdict",
            cluster=cluster,
            object_type="configmap",
            object_name=configmap,
            object_namespace=namespace,
            json_path=f".data.{key}",
            timeout=Duration.seconds(VERDICT_WAIT_S),
        )
        self.verdict.node.add_dependency(self.job)
        self.result = eks.KubernetesManifest(
            self, "Result", cluster=cluster, manifest=[result_document(namespace, self.verdict.value)]
        )
        self.result.node.add_dependency(self.verdict)
