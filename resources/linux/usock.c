/* usock SOCKET TRIGGER SEND END SECS: a unix-socket client for console tests (busybox nc has no
 * unix sockets). Connects to SOCKET (retrying while it does not exist yet), copies everything it
 * receives to stdout, sends SEND (with "\n" turned into a newline) once the received text
 * contains TRIGGER, and exits 0 once it contains END (after SEND), or 1 after SECS seconds. */
#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
    if (argc != 6) {
        fprintf(stderr, "usage: usock SOCKET TRIGGER SEND END SECS\n");
        return 2;
    }
    double deadline = now() + atof(argv[5]);
    struct sockaddr_un a = { .sun_family = AF_UNIX };
    if (strlen(argv[1]) >= sizeof(a.sun_path)) {
        fprintf(stderr, "usock: path too long\n");
        return 2;
    }
    strcpy(a.sun_path, argv[1]);
    int fd = -1;
    while (now() < deadline) {
        fd = socket(AF_UNIX, SOCK_STREAM, 0);
        if (fd >= 0 && connect(fd, (struct sockaddr *)&a, sizeof(a)) == 0)
            break;
        if (fd >= 0)
            close(fd);
        fd = -1;
        usleep(100000);
    }
    if (fd < 0) {
        fprintf(stderr, "usock: cannot connect to %s: %s\n", argv[1], strerror(errno));
        return 1;
    }
    char send_buf[1024];
    size_t n = 0;
    for (const char *s = argv[3]; *s && n < sizeof(send_buf) - 1; s++) {
        if (s[0] == '\\' && s[1] == 'n') {
            send_buf[n++] = '\n';
            s++;
        } else {
            send_buf[n++] = *s;
        }
    }
    static char seen[1 << 16];
    size_t len = 0;
    int sent = 0;
    while (now() < deadline) {
        struct pollfd p = { .fd = fd, .events = POLLIN };
        if (poll(&p, 1, 100) <= 0)
            continue;
        char buf[4096];
        ssize_t r = read(fd, buf, sizeof(buf));
        if (r <= 0)
            break;
        fwrite(buf, 1, (size_t)r, stdout);
        fflush(stdout);
        for (ssize_t i = 0; i < r; i++)
            if (buf[i] != '\0' && len < sizeof(seen) - 1)
                seen[len++] = buf[i];
        seen[len] = '\0';
        if (!sent && strstr(seen, argv[2])) {
            if (write(fd, send_buf, n) != (ssize_t)n) {
                fprintf(stderr, "usock: write failed\n");
                return 1;
            }
            sent = 1;
            len = 0; /* END must come after what we sent */
        } else if (sent && strstr(seen, argv[4])) {
            return 0;
        }
    }
    fprintf(stderr, "usock: %s\n", sent ? "END never came" : "TRIGGER never came");
    return 1;
}
