# Container images. Needs a Docker engine (docker build); the tests lint the Dockerfiles
# with hadolint instead (tests/unit/test_images.py). Override e.g.
#   make images REGISTRY=registry.local/kquant TAG=dev
REGISTRY ?= ghcr.io/kquant
TAG ?= $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
DOCKER ?= docker

.PHONY: images image-operator image-job

images: image-operator image-job

image-operator:
	$(DOCKER) build -f operator/Dockerfile -t $(REGISTRY)/kquant-operator:$(TAG) .

image-job:
	$(DOCKER) build -f job_image/Dockerfile -t $(REGISTRY)/kquant-job:$(TAG) .
