/*
 * LD_PRELOAD shim for tests: rename(2) sleeps SLOW_RENAME_MS milliseconds (from the
 * environment) before renaming, so a test can kill a process between writing a temporary
 * file and renaming it into place. Test code only: the vmm has no such hook.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

int rename(const char *old, const char *new)
{
	static int (*real)(const char *, const char *);
	const char *ms = getenv("SLOW_RENAME_MS");

	if (!real)
		real = (int (*)(const char *, const char *))dlsym(RTLD_NEXT, "rename");
	if (ms) {
		long v = atol(ms);
		struct timespec t = { v / 1000, (v % 1000) * 1000000L };
		nanosleep(&t, NULL);
	}
	return real(old, new);
}
