#!/bin/bash
echo "provisioned by a script" > /var/log/provisioned
