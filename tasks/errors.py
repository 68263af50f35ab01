"""One set of error types for the tasks (AWS and SSH), each with its exit code and the next step that helps.

A failed AWS call is sorted by its error code (`advice`): a missing permission names the
action and the policy file, an account limit names the quota and how to raise it, an
unsupported type or zone says which, bad credentials say where they come from, and only
what re-running can cure (throttling, a moment of eventual consistency, a 5xx) says "re-run".
"""
import re

from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError, PartialCredentialsError
from invoke.exceptions import Exit

POLICY = "iam/digits-operator.json"

DENIED = {"UnauthorizedOperation", "AccessDenied", "AccessDeniedException", "UnauthorizedAccess",
          "Client.UnauthorizedOperation"}
CREDENTIALS = {"AuthFailure", "InvalidClientTokenId", "ExpiredToken", "ExpiredTokenException",
               "SignatureDoesNotMatch", "UnrecognizedClientException", "InvalidAccessKeyId"}
# Account limits: (what the limit is, Service Quotas' service and quota code to raise it).
QUOTAS = {
    "VcpuLimitExceeded": ("Running On-Demand Standard instances (vCPUs)", "ec2", "L-1216C47A"),
    "InstanceLimitExceeded": ("Running On-Demand Standard instances (vCPUs)", "ec2", "L-1216C47A"),
    "AddressLimitExceeded": ("EC2-VPC Elastic IPs", "ec2", "L-0263D0A3"),
    "VpcLimitExceeded": ("VPCs per Region", "vpc", "L-F678F1CE"),
    "NatGatewayLimitExceeded": ("NAT gateways per Availability Zone", "vpc", "L-FE5A380F"),
    "InternetGatewayLimitExceeded": ("Internet gateways per Region", "vpc", "L-A4707A72"),
    "SecurityGroupLimitExceeded": ("VPC security groups per Region", "vpc", "L-E79EC296"),
    "RulesPerSecurityGroupLimitExceeded": ("Inbound or outbound rules per security group", "vpc", "L-0EA8095F"),
}
# The instance type or the zone: re-running the same request gets the same answer.
PLACEMENT = {"Unsupported", "InvalidInstanceType", "UnsupportedOperation"}
# What a moment later may cure: botocore retried these already, a re-run resumes.
TRANSIENT = {"RequestLimitExceeded", "Throttling", "ThrottlingException", "Unavailable", "ServiceUnavailable",
             "InternalError", "InternalFailure", "RequestTimeout", "DependencyViolation", "IncorrectState",
             "IncorrectInstanceState"}
# botocore's operation names whose service is not EC2 (for a permission's name).
SERVICES = {"GetCallerIdentity": "sts", "GetServiceQuota": "servicequotas", "GetParameter": "ssm"}
# S3's operations (the back-end tier's bucket) by their IAM action: S3's denials do not name it.
S3_ACTIONS = {"CreateBucket": "s3:CreateBucket", "GetBucketVersioning": "s3:GetBucketVersioning",
              "PutBucketVersioning": "s3:PutBucketVersioning", "PutPublicAccessBlock": "s3:PutBucketPublicAccessBlock",
              "PutBucketEncryption": "s3:PutEncryptionConfiguration", "PutBucketTagging": "s3:PutBucketTagging",
              "PutObject": "s3:PutObject", "GetObject": "s3:GetObject", "HeadObject": "s3:GetObject",
              "ListObjectVersions": "s3:ListBucketVersions", "DeleteObjects": "s3:DeleteObjectVersion",
              "DeleteBucket": "s3:DeleteBucket"}


class ConfigError(Exit):
    """Bad settings, found before anything is created (exit 2)."""

    def __init__(self, message):
        super().__init__(f"bad config: {message}", code=2)
        self.args = (self.message,)


class HostKeyChanged(Exit):
    """A host's key differs from the one recorded: never retried, never accepted silently."""


class ConnectionLost(Exception):
    """The SSH connection died under a step (sshd killed, host rebooted, network gone);
    `remote.Report` turns it into an error naming the step and the task to re-run."""

    def __init__(self, step, cause=None):
        super().__init__(step)
        self.step, self.cause = step, cause


class StepFailed(Exit):
    """An AWS step failed: the message names the resource, what went wrong and the next step."""

    def __init__(self, resource, task, error, next_step=None):
        super().__init__(f"step failed: {resource}: {error}\n{next_step or advice(error, task)}")
        self.args = (self.message,)
        self.resource = resource


def raise_quota(service, quota, value="N"):
    """How a quota is raised: the CLI command, or the console."""
    return (f"`aws service-quotas request-service-quota-increase --service-code {service} --quota-code {quota}"
            f" --desired-value {value}` (or the Service Quotas console)")


# Codes AWS answers for a resource it has just created and does not know yet (eventual
# consistency): worth a few retries right after the create, never otherwise.
NEW_VPC_NOT_FOUND = ("InvalidVpcID.NotFound",)
NEW_SUBNET_NOT_FOUND = ("InvalidSubnetID.NotFound",)
NEW_TABLE_NOT_FOUND = ("InvalidRouteTableID.NotFound",)
NEW_GATEWAY_NOT_FOUND = ("InvalidInternetGatewayID.NotFound", "InvalidGatewayID.NotFound")
NEW_ADDRESS_NOT_FOUND = ("InvalidAllocationID.NotFound", "InvalidInstanceID.NotFound")
# What RunInstances may not see yet right after `create-vpc` or the key pair's import.
NEW_RESOURCE_NOT_FOUND = ("InvalidKeyPair.NotFound", "InvalidGroup.NotFound", "InvalidSubnetID.NotFound",
                          "InvalidSubnet.NotFound")
# What RunInstances answers without a subnet in an account that has no default VPC.
NEEDS_A_SUBNET = ("VPCIdNotSpecified", "MissingInput", "InvalidParameterCombination")


def code(error):
    """The AWS error code of a botocore error ("" for a connection error or anything else)."""
    if isinstance(error, ClientError):
        return str(error.response.get("Error", {}).get("Code") or "")
    return ""


def action(error):
    """The IAM action a denied call needed: from AWS's message when it says, else from the operation."""
    said = re.search(r"perform: ([a-z0-9-]+:[A-Za-z0-9]+)", str(error))
    if said:
        return said[1]
    operation = getattr(error, "operation_name", None) or "?"
    if operation in S3_ACTIONS:
        return S3_ACTIONS[operation]
    return f"{SERVICES.get(operation, 'ec2')}:{operation}"


def advice(error, task):
    """The next step that will actually help, for this error."""
    rerun = f"re-run `fab {task}`: it finds what exists by tags and creates only the rest"
    found = code(error)
    if found in DENIED:
        return (f"missing permission {action(error)}: attach the policy in {POLICY} to your IAM user or role"
                f" (docs/aws.md, \"Before your first deploy\"), then {rerun}")
    if found in CREDENTIALS or isinstance(error, (NoCredentialsError, PartialCredentialsError)):
        return ("your AWS credentials were refused or are missing: check `aws sts get-caller-identity`"
                " (AWS_PROFILE, aws.profile, ~/.aws/credentials), then " + rerun)
    if found in QUOTAS:
        name, service, quota = QUOTAS[found]
        return f"an account limit: {name}. Free some, or raise it: {raise_quota(service, quota)}; once granted, {rerun}"
    if found == "PendingVerification":
        return ("AWS is still verifying this account or region (up to about 4 hours for a new one): wait for"
                " its e-mail, then " + rerun)
    if found in ("OptInRequired", "Blocked"):
        return ("this account or region is not enabled for EC2 (opt-in region, unfinished sign-up or a"
                " blocked account): enable it in the AWS console (Account, AWS Regions), then " + rerun)
    if found == "InsufficientInstanceCapacity":
        return ("AWS has no capacity for this type in this zone right now: re-run later, or choose another type"
                " (aws.instance_types.<role>); `fab preflight` lists what the zones offer")
    if found in PLACEMENT:
        return ("the instance type or its availability zone: `fab preflight` lists what this region's zones"
                " offer; set aws.instance_types.<role> to one offered there (or another aws.region), then "
                + rerun)
    if found in TRANSIENT or isinstance(error, BotoCoreError) or found.isdigit():
        return rerun
    return f"fix what AWS says above, then {rerun}"


def is_denied(error):
    return code(error) in DENIED


class QuotaExceeded(Exit):
    """An account limit the next step would pass, found before anything is created (exit 3)."""

    def __init__(self, detail):
        super().__init__(f"account limit: {detail}\nnothing was created; once the limit is raised or some"
                         " resources are freed, re-run", code=3)
        self.args = (self.message,)


class PreflightFailed(Exit):
    """`fab preflight` found problems (exit 2); the table above says what each is."""

    def __init__(self, problems):
        super().__init__(f"preflight: {len(problems)} problem(s): {', '.join(problems)}; fix them (see above),"
                         " then run `fab preflight` again", code=2)
        self.args = (self.message,)
