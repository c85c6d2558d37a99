"""cluster.yaml is a config Ray's own cluster launcher accepts, and installs this project."""

from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER_YAML = Path(__file__).parent.parent / "cluster.yaml"


def test_cluster_yaml_passes_rays_schema():
    config = yaml.safe_load(CLUSTER_YAML.read_text())
    validate_config(prepare_config(config))
    assert config["file_mounts"] == {"~/arb-pipeline": "."}
    assert any("pip install" in c and "~/arb-pipeline" in c for c in config["setup_commands"])


def test_the_schema_check_catches_a_typo():
    config = yaml.safe_load(CLUSTER_YAML.read_text())
    config["max_wokers"] = 3
    with pytest.raises(Exception, match="max_wokers"):
        validate_config(prepare_config(config))
