/* LD_PRELOAD shim: writes the CLOCK_REALTIME time of the process's first KVM_RUN ioctl to the
 * file named by $FIRST_KVM_RUN_FILE ("seconds.nanoseconds\n"), and the process's CPU time then
 * (CLOCK_PROCESS_CPUTIME_ID, all threads) to $FIRST_KVM_RUN_CPU_FILE if set; then passes every
 * ioctl on. Used by startup.sh and scale.sh to time execve -> first KVM_RUN without a tracer.
 * Build: gcc -shared -fPIC -O2 -o first-kvm-run.so first-kvm-run.c -ldl */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

#define KVM_RUN_REQUEST 0xAE80UL /* _IO(KVMIO, 0x80) */

static int seen;
static int out_fd = -1;
static int cpu_fd = -1;

/* The file is opened when the shim loads: the monitor's vCPU thread runs under a seccomp
 * filter that allows write() and close() but not open(). */
__attribute__((constructor)) static void open_output(void)
{
	const char *path = getenv("FIRST_KVM_RUN_FILE");

	if (path)
		out_fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	path = getenv("FIRST_KVM_RUN_CPU_FILE");
	if (path)
		cpu_fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
}

static void put_time(int *fd, const struct timespec *ts)
{
	char buf[64];
	int n = snprintf(buf, sizeof buf, "%lld.%09ld\n", (long long)ts->tv_sec, ts->tv_nsec);

	if (*fd < 0)
		return;
	if (write(*fd, buf, (size_t)n) != n) { /* nothing to do */ }
	close(*fd);
	*fd = -1;
}

int ioctl(int fd, unsigned long request, ...)
{
	static int (*real)(int, unsigned long, ...);
	va_list ap;
	void *arg;

	va_start(ap, request);
	arg = va_arg(ap, void *);
	va_end(ap);
	if (request == KVM_RUN_REQUEST && !__atomic_exchange_n(&seen, 1, __ATOMIC_SEQ_CST)) {
		struct timespec ts, cpu;

		clock_gettime(CLOCK_REALTIME, &ts);
		clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &cpu);
		put_time(&out_fd, &ts);
		put_time(&cpu_fd, &cpu);
	}
	if (!real)
		real = (int (*)(int, unsigned long, ...))dlsym(RTLD_NEXT, "ioctl");
	return real(fd, request, arg);
}
