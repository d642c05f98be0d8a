"""Connecting to the API server, the same way for every role."""

from __future__ import annotations

import os

import kubernetes


def load_api_client(pool_size: int = 4) -> kubernetes.client.ApiClient:
    """In-cluster credentials in a pod, else $KUBECONFIG / ~/.kube/config.

    `pool_size` bounds the connections kept open: the operator writes in parallel.
    """
    configuration = kubernetes.client.Configuration()
    try:
        kubernetes.config.load_incluster_config(  # type: ignore[no-untyped-call]
            client_configuration=configuration)
    except kubernetes.config.ConfigException:
        # $KUBECONFIG read now: the library reads it once, when it is first imported.
        kubernetes.config.load_kube_config(  # type: ignore[no-untyped-call]
            config_file=os.environ.get("KUBECONFIG"), client_configuration=configuration)
    configuration.connection_pool_maxsize = pool_size
    return kubernetes.client.ApiClient(configuration)
