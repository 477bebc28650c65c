# The set-up commands of the README. All work on a fresh Debian 12 machine.
.PHONY: bench bench-storage test

bench:  ## main job: build the venv, start a local SeaweedFS, replay the shared-prefix workload through SGLang's HiCache
	@PY=$$(.ci/venv.sh 0.5.23 | tail -1) && $$PY benchmarks/shared_prefix.py replay $(ARGS)

bench-storage:  ## the storage benchmark: SGLang's interface, objectcache vs SGLang's seaweedfs backend
	@PY=$$(.ci/venv.sh 0.5.23 | tail -1) && $$PY benchmarks/storage.py $(ARGS)

test:   ## install Ceph + both SGLang releases on CPU, start S3 servers, run the tests
	@bash .ci/test.sh $(ARGS)
