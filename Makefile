# The two set-up commands of the README. Both work on a fresh Debian 12 machine.
.PHONY: bench test

bench:  ## main job: build the venv, start a local SeaweedFS, run the storage benchmark
	@PY=$$(.ci/venv.sh 0.5.23 | tail -1) && $$PY benchmarks/storage.py $(ARGS)

test:   ## install Ceph + both SGLang releases on CPU, start S3 servers, run the tests
	@bash .ci/test.sh $(ARGS)
