/*
 * vsock-echo: a tiny guest-side AF_VSOCK echo server for checking the VM plumbing without the agent.
 *
 * Usage (in the guest): vsock-echo PORT
 * Accepts connections on (any CID, PORT) one at a time and writes back every byte it reads until the peer
 * closes. /init starts it in the background when booted with ccagent.echo=PORT; the harness self-check then
 * connects through the hybrid-vsock socket (CONNECT PORT) and expects its bytes back.
 * Built statically by tests/vm/prepare.sh (gcc -static), since the guest has no libc.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
#include <linux/vm_sockets.h>

static int echo_until_eof(int fd)
{
    char buf[65536];
    for (;;) {
        ssize_t n = read(fd, buf, sizeof buf);
        if (n == 0)
            return 0;
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        for (ssize_t off = 0; off < n;) {
            ssize_t w = write(fd, buf + off, (size_t)(n - off));
            if (w < 0) {
                if (errno == EINTR)
                    continue;
                return -1;
            }
            off += w;
        }
    }
}

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: vsock-echo PORT\n");
        return 2;
    }
    char *end = NULL;
    unsigned long port = strtoul(argv[1], &end, 10);
    if (end == argv[1] || *end != '\0' || port == 0 || port > 0xffffffffUL) {
        fprintf(stderr, "vsock-echo: bad port %s\n", argv[1]);
        return 2;
    }

    int lfd = socket(AF_VSOCK, SOCK_STREAM, 0);
    if (lfd < 0) {
        perror("vsock-echo: socket");
        return 1;
    }
    struct sockaddr_vm addr;
    memset(&addr, 0, sizeof addr);
    addr.svm_family = AF_VSOCK;
    addr.svm_cid = VMADDR_CID_ANY;
    addr.svm_port = (unsigned int)port;
    if (bind(lfd, (struct sockaddr *)&addr, sizeof addr) < 0 || listen(lfd, 4) < 0) {
        perror("vsock-echo: bind/listen");
        return 1;
    }
    printf("vsock-echo: listening on port %lu\n", port);
    fflush(stdout);
    for (;;) {
        int fd = accept(lfd, NULL, NULL);
        if (fd < 0) {
            if (errno == EINTR)
                continue;
            perror("vsock-echo: accept");
            return 1;
        }
        if (echo_until_eof(fd) < 0)
            perror("vsock-echo: echo");
        close(fd);
    }
}
